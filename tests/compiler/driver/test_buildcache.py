"""kiln as a build step: byte-identical outputs, --check (0 current / 1 stale, nothing
written), the content-addressed build cache (hits, damaged entries, another CPU's key)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.compiler.driver import buildcache
from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"


def _compile(out: Path, *extra: str, spec: str = "reparam") -> int:
    return main(["compile", str(EXAMPLE), "--spec", spec, "--no-build", "-q", "-o", str(out),
                 *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_inputs_give_byte_identical_onnx_and_model_hash(tmp_path):
    assert _compile(tmp_path / "a", "--no-cache") == 0
    assert _compile(tmp_path / "b", "--no-cache") == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert json.loads((a / "report.json").read_text())["model_hash"] == \
        json.loads((b / "report.json").read_text())["model_hash"]


def test_check_is_0_when_current_and_1_when_stale_and_writes_nothing(tmp_path, capsys):
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    assert _compile(out, "--cache", cache) == 0
    assert (out / "inputs.json").is_file()
    before = _snapshot(out)
    capsys.readouterr()
    assert _compile(out, "--check", "--cache", cache) == 0
    assert capsys.readouterr().out.strip() == f"{out}: up to date"
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\npasses:\n  - fold_batchnorm: {}\n")
    assert _compile(out, "--check", spec=str(spec)) == 1
    assert "stale: changed since the build: spec" in capsys.readouterr().out
    assert _compile(out, "--check", "--input", "x=2x3x32x32") == 1
    assert "inputs" in capsys.readouterr().out
    (out / "model.onnx").write_bytes(b"edited")
    assert _compile(out, "--check") == 1
    assert "stale: model.onnx was changed since it was written" in capsys.readouterr().out
    (out / "model.onnx").write_bytes(before["model.onnx"])
    (out / "report.json").unlink()
    assert _compile(out, "--check") == 1
    assert "report.json was removed" in capsys.readouterr().out
    assert _compile(tmp_path / "never", "--check") == 1
    assert not (tmp_path / "never").exists()


def test_check_without_outdir_is_a_usage_error(capsys):
    assert main(["compile", str(EXAMPLE), "--spec", "reparam", "--check"]) == 2
    assert "--check needs -o OUTDIR" in capsys.readouterr().err


def test_cache_hit_copies_the_build_and_an_up_to_date_outdir_is_left_alone(tmp_path, capsys):
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    assert _compile(first, "--cache", str(cache)) == 0
    entries = list(cache.glob("*/*"))
    assert len(entries) == 1 and (entries[0] / "inputs.json").is_file()
    capsys.readouterr()
    assert main(["compile", str(EXAMPLE), "--spec", "reparam", "--no-build", "-o", str(second),
                 "--cache", str(cache)]) == 0
    assert "from the build cache" in capsys.readouterr().out
    assert _snapshot(first) == _snapshot(second)
    files = _snapshot(second)
    os.utime(second / "model.onnx", (1, 1))
    assert main(["compile", str(EXAMPLE), "--spec", "reparam", "--no-build", "-o", str(second),
                 "--cache", str(cache)]) == 0
    assert "up to date, nothing compiled" in capsys.readouterr().out
    assert _snapshot(second) == files                       # same bytes, touched for make
    assert (second / "model.onnx").stat().st_mtime > 1


def test_a_damaged_cache_entry_is_dropped_and_the_compile_runs(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _compile(tmp_path / "first", "--cache", str(cache)) == 0
    (entry,) = cache.glob("*/*")
    (entry / "model.onnx").write_bytes(b"bit rot")
    capsys.readouterr()
    assert main(["compile", str(EXAMPLE), "--spec", "reparam", "--no-build", "-o",
                 str(tmp_path / "second"), "--cache", str(cache)]) == 0
    assert "from the build cache" not in capsys.readouterr().out
    assert (tmp_path / "second" / "model.onnx").read_bytes() == \
        (tmp_path / "first" / "model.onnx").read_bytes()
    assert (entry / "model.onnx").read_bytes() != b"bit rot"   # stored again, whole


def test_key_parts_follow_the_inputs(tmp_path, monkeypatch):
    from kiln.compiler.driver.specs import load_spec

    spec = load_spec("reparam")
    key, why = buildcache.build_key(EXAMPLE, spec, target="host")
    assert why is None and key is not None
    again, _ = buildcache.build_key(EXAMPLE, spec, target="host")
    assert again == key
    other_cpu = "x86-64-v4" if os.environ.get("KILN_HOST_MCPU") == "x86-64-v3" else "x86-64-v3"
    monkeypatch.setenv("KILN_HOST_MCPU", other_cpu)         # another CPU: another key
    other, _ = buildcache.build_key(EXAMPLE, spec, target="host")
    assert other.key != key.key and other.parts["target"] != key.parts["target"]
    assert other.parts["model"] == key.parts["model"]
    data = tmp_path / "calib.npz"
    data.write_bytes(b"one")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"kiln: 1\ncalibration: {{source: 'npz:{data}'}}\npasses: []\n")
    one, _ = buildcache.build_key(EXAMPLE, load_spec(str(spec_file)), target=None)
    data.write_bytes(b"two")                                  # the calibration data changed
    two, _ = buildcache.build_key(EXAMPLE, load_spec(str(spec_file)), target=None)
    assert one.parts["spec_files"] != two.parts["spec_files"]


def test_no_key_for_python_callables(tmp_path):
    from kiln.compiler.driver.specs import load_spec

    key, why = buildcache.build_key("kiln.compiler.testing.torch_models:encoder",
                                    load_spec("fp32"), target="host")
    assert key is None and "not a file" in why


def test_cache_env_switches(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_BUILD_CACHE", "off")
    assert buildcache.default_cache_dir() is None
    monkeypatch.setenv("KILN_BUILD_CACHE", "on")
    monkeypatch.setenv("KILN_BUILD_CACHE_DIR", str(tmp_path))
    assert buildcache.default_cache_dir() == tmp_path
    monkeypatch.delenv("KILN_BUILD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert buildcache.default_cache_dir() == tmp_path / "xdg" / "kiln" / "builds"


def test_unwritable_cache_only_warns(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a folder")
    assert _compile(tmp_path / "out", "--cache", str(blocker)) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert "build cache" in caplog.text and "not written" in caplog.text


def test_only_folder_sources_are_walked(tmp_path, monkeypatch):
    """A spec string that happens to name a folder is not hashed (only `folder:` sources)."""
    from kiln.compiler.driver.specs import load_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "MatMul").mkdir()
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("kiln: 1\npasses:\n  - fold_batchnorm: {select: {op: MatMul}}\n")
    one, _ = buildcache.build_key(EXAMPLE, load_spec(str(spec_file)), target=None)
    (tmp_path / "MatMul" / "big.bin").write_bytes(b"x" * 1000)
    two, _ = buildcache.build_key(EXAMPLE, load_spec(str(spec_file)), target=None)
    assert one == two
