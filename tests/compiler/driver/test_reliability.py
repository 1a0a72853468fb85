"""Reliability of `kiln compile -o OUTDIR` and `kiln run` (issue 15, items 1-3, 6):
one build per folder, all or nothing; interrupts and faults leave OUTDIR as it was;
reports match the files; a damaged or mixed artifact is refused before it is loaded.

Interrupts are sent to a `kiln compile` subprocess paused at a known point
(``KILN_TEST_PAUSE``, see ``kiln.compiler.core.interrupt.checkpoint``). The default run
keeps one fast case of each kind; the other points run with KILN_SLOW=1.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.compiler.core.interrupt import PAUSE_ENV
from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
#: specs/reparam.yaml's passes, in order
REPARAM_PASSES = ["fold_parametrization", "merge_lora", "merge_branches", "dedupe_weights",
                  "fold_batchnorm"]
USER_FILE = "notes.txt"
#: a subprocess compile of the tiny CNN takes a few seconds; far more means a hang
SUBPROCESS_TIMEOUT_S = 120


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(outdir: Path) -> dict:
    """OUTDIR's files (bytes and mtimes) and its parent's entries (no leftover staging)."""
    files = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in sorted(outdir.iterdir())} \
        if outdir.exists() else None
    return {"files": files, "beside": sorted(p.name for p in outdir.parent.iterdir())}


def compile_args(outdir: Path, *extra: str, build: bool = False) -> list[str]:
    return ["compile", str(EXAMPLE), "--spec", "reparam", "-o", str(outdir),
            *(["--target", "host"] if build else ["--no-build"]), *extra]


@pytest.fixture
def earlier_build(tmp_path, capsys) -> Path:
    """OUTDIR holding an earlier kiln build and a file of the user's."""
    out = tmp_path / "out"
    assert main(compile_args(out, "-q")) == 0, capsys.readouterr().err
    (out / USER_FILE).write_text("mine")
    return out


def pause_line(stderr) -> str:
    """The first stderr line that is not a progress line (a slow step prints ``kiln: ...``)."""
    line = stderr.readline()
    while line.startswith("kiln: ") and not line.startswith("kiln: error"):
        line = stderr.readline()
    return line


def kiln_subprocess(args: list[str], *, pause: str | None = None,
                    send: signal.Signals | None = None, preexec=None):
    """Run kiln in a subprocess; with ``pause``, wait until it pauses there, send ``send``.
    Returns (exit code, stderr without the pause line). (Not with -q: that silences fd 2,
    where the pause line goes.)"""
    env = dict(os.environ)
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    proc = subprocess.Popen([sys.executable, "-m", "kiln.compiler.driver.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, preexec_fn=preexec)
    first = ""
    if pause:
        first = pause_line(proc.stderr)
        assert first == f"kiln-test: paused at {pause}\n", first + proc.stderr.read()
        proc.send_signal(send or signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


# -- 1. one build, one folder ----------------------------------------------------------

def test_rerun_replaces_kiln_files_removes_stale_ones_keeps_user_files(earlier_build, capsys):
    out = earlier_build
    # kiln files an earlier (built) run left that a --no-build run does not write
    (out / "model.so").write_bytes(b"old library")
    (out / "manifest.json").write_text("{}")
    assert main(compile_args(out)) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.onnx", "report.json",
                                                            USER_FILE])
    assert (out / USER_FILE).read_text() == "mine"
    assert f"wrote {out}/: model.onnx, report.json (" in stdout  # this run's files only
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging left"


def test_second_run_into_a_locked_folder_refuses_at_once(earlier_build, capsys):
    out = earlier_build
    before = snapshot(out)
    lock = out.parent / f".{out.name}.kiln-lock"
    with open(lock, "w") as handle:  # what a first run holds while it works
        handle.write("4242\n")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        code = main(compile_args(out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"kiln: error: {out}: another kiln compile (pid 4242) is writing "
                           "this folder; wait for it or choose another -o OUTDIR")
    lock.unlink()
    assert snapshot(out) == before


def test_concurrent_run_refuses_while_the_first_works(earlier_build, capsys):
    out = earlier_build
    before = snapshot(out)
    env = dict(os.environ, **{PAUSE_ENV: "pass"})
    first = subprocess.Popen([sys.executable, "-m", "kiln.compiler.driver.cli",
                              *compile_args(out)], stderr=subprocess.PIPE, text=True,
                             env=env, cwd=REPO)
    try:
        assert pause_line(first.stderr) == "kiln-test: paused at pass\n"
        code = main(compile_args(out, "--spec", "fp32"))
        err = capsys.readouterr().err
        assert code == 2 and f"another kiln compile (pid {first.pid})" in err
        assert snapshot(out)["files"] == before["files"]  # (the first's staging is beside)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert first.returncode == 130 and snapshot(out) == before


def test_python_api_save_lists_what_it_wrote(tmp_path):
    from kiln.compiler.driver.compile import compile_model

    result = compile_model(EXAMPLE, "reparam")
    out = result.save(tmp_path / "out")
    assert out == tmp_path / "out"
    assert result.written == [out / "model.onnx", out / "report.json"]


def test_a_failed_move_at_the_commit_puts_everything_back(earlier_build, capsys,
                                                          monkeypatch):
    """E.g. a read-only OUTDIR: the error names the final file, not a temporary one."""
    out = earlier_build
    (out / "model.so").write_bytes(b"old library")  # a stale file the commit moves out
    before = snapshot(out)
    real = os.replace

    def refuse_model_onnx(src, dst):  # the new model.onnx; putting the old back works
        if Path(dst) == out / "model.onnx" and ".kiln-old-" not in str(src):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_model_onnx)
    code = main(compile_args(out))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"kiln: error: {out / 'model.onnx'}: cannot write output " \
                          "(Permission denied)"
    assert snapshot(out) == before


def test_staging_left_by_a_killed_run_is_removed_by_the_next(earlier_build, capsys):
    out = earlier_build
    stale = out.parent / f".{out.name}.kiln-abcd_123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    assert main(compile_args(out, "-q")) == 0
    assert not stale.exists()


# -- 2. interrupts and faults ----------------------------------------------------------

def check_interrupted(out: Path, before: dict, code: int, err: str) -> None:
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "kiln: interrupted", err
    assert "TVM compile failed" not in err and "BlockBuilder" not in err
    assert "Traceback" not in err, err
    assert snapshot(out) == before


@pytest.mark.parametrize("point, build, send", [
    ("pass", False, signal.SIGINT),
    ("pass", False, signal.SIGTERM),
    ("build", True, signal.SIGINT),  # lands inside tvm.compile's C++ (a Python callback)
    pytest.param("load", False, signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("verify", False, signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("write", False, signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("commit", False, signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("build", True, signal.SIGTERM, marks=pytest.mark.slow),
])
def test_interrupt_leaves_outdir_as_it_was(earlier_build, point, build, send):
    out = earlier_build
    before = snapshot(out)
    code, err = kiln_subprocess(compile_args(out, build=build), pause=point, send=send)
    check_interrupted(out, before, code, err)


def test_interrupt_into_a_new_folder_creates_nothing(tmp_path):
    out = tmp_path / "new"
    before = snapshot(out)
    code, err = kiln_subprocess(compile_args(out), pause="write")
    check_interrupted(out, before, code, err)
    assert not out.exists()


def test_an_interrupt_during_the_commit_is_held_until_it_ends():
    """Even when the signal reaches another thread (one of TVM's workers): Python runs the
    handler in the main thread, which must not stop half-way through the renames."""
    import threading

    from kiln.compiler.core import interrupt

    moved = []
    parked = threading.Event()
    release = threading.Event()
    worker = threading.Thread(target=lambda: (parked.set(), release.wait(10)))
    worker.start()
    parked.wait(10)
    try:
        with interrupt.handled(), pytest.raises(KeyboardInterrupt):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                signal.pthread_kill(worker.ident, signal.SIGINT)
                for step in range(3):
                    time.sleep(0.05)  # the worker's C handler runs; Python's would run next
                    moved.append(step)
            moved.append("after")  # not reached: raised as the block ends
    finally:
        release.set()
        worker.join()
    assert moved == [0, 1, 2]


def test_interrupted_tvm_objects_are_freed_without_native_warnings(capfd):
    """An interrupt inside TVM's ONNX import leaves a BlockBuilder with open blocks, whose
    destructor warns on stderr; after `kiln: interrupted` it is freed silently."""
    from tvm import relax

    from kiln.compiler.core.interrupt import release_quietly

    def interrupted_import():
        builder = relax.BlockBuilder()
        builder._begin_dataflow_block()
        raise KeyboardInterrupt

    for quiet in (False, True):
        try:
            interrupted_import()
        except KeyboardInterrupt as error:
            if quiet:
                release_quietly(error)
        warned = "BlockBuilder destroyed" in capfd.readouterr().err
        assert warned is not quiet  # the warning is real, and silenced
    sys.stderr.write("still here\n")
    assert capfd.readouterr().err == "still here\n"  # fd 2 restored


def test_disk_full_writing_the_model_names_the_file_and_the_cause(earlier_build, capsys,
                                                                  monkeypatch):
    out = earlier_build
    before = snapshot(out)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code = main(compile_args(out))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"kiln: error: no space left on device writing {out / 'model.onnx'}"
    assert snapshot(out) == before


def test_disk_full_before_the_library_is_written(earlier_build, capsys, monkeypatch):
    """LLVM would end the process on a full disk: the room is checked before the export."""
    out = earlier_build
    before = snapshot(out)
    real = os.statvfs

    def full(path):
        stat = real(path)
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 0, 0,
                                  *tuple(stat)[5:]))

    monkeypatch.setattr(os, "statvfs", full)
    code = main(compile_args(out, build=True))
    err = capsys.readouterr().err
    assert code == 2
    # a busy machine may print progress lines for steps over a second first
    lines = [line for line in err.strip().splitlines() if not line.startswith("kiln: build:")]
    assert len(lines) == 1, err  # one error line; a fault: no failed report either
    assert lines[0].startswith("kiln: error: no space left on device writing model.so "
                               "(0 bytes free")
    assert snapshot(out) == before


def test_out_of_memory_in_the_build_is_a_fault(earlier_build, capsys, monkeypatch):
    import tvm

    out = earlier_build
    before = snapshot(out)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(tvm, "compile", no_memory)
    code = main(compile_args(out, build=True))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "kiln: error: target 'host': out of memory during TVM compile"
    assert snapshot(out) == before


def test_lowering_failure_keeps_the_earlier_build_and_reports_beside_it(earlier_build, capsys,
                                                                        monkeypatch):
    import tvm

    out = earlier_build
    before = snapshot(out)

    def refuse(*args, **kwargs):
        raise RuntimeError("Check failed: op is not supported")

    monkeypatch.setattr(tvm, "compile", refuse)
    code = main(compile_args(out, build=True))
    err = capsys.readouterr().err
    assert code == 2 and "TVM compile failed: Check failed: op is not supported" in err
    assert snapshot(out)["files"] == before["files"]  # no new model.onnx beside the old build
    beside = out.parent / "out.failed-report.json"
    report = json.loads(beside.read_text())
    assert report["status"] == "failed" and report["error"]["kind"] == "LoweringError"
    assert [p["name"] for p in report["passes"]] == REPARAM_PASSES


@pytest.mark.slow
def test_file_size_limit_while_linking_the_library(earlier_build):
    """RLIMIT_FSIZE stands in for a full disk (no tmpfs without root): model.onnx (13 KB)
    fits under it, model.so (~100 KB) does not."""
    out = earlier_build
    before = snapshot(out)
    limit = 48 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, err = kiln_subprocess(compile_args(out, build=True), preexec=small_files)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(
        "kiln: error: file size limit exceeded writing model.so (ulimit -f allows 49152 bytes")
    assert snapshot(out) == before


# -- 3. reports that match the files ---------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A host build of the example (model.onnx, model.so, manifest.json, report.json)."""
    out = tmp_path_factory.mktemp("built") / "out"
    assert main(compile_args(out, "-q", build=True)) == 0
    return out


def test_one_model_hash_of_the_shipped_files(built):
    report = json.loads((built / "report.json").read_text())
    manifest = json.loads((built / "manifest.json").read_text())
    assert report["status"] == "ok"
    # the documented definition: sha256sum model.onnx model.so | sha256sum
    listing = "".join(f"{sha256(built / n)}  {n}\n" for n in ("model.onnx", "model.so"))
    expected = "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    assert report["model_hash"] == manifest["model_hash"] == expected
    assert manifest["files"] == {n: sha256(built / n)
                                 for n in ("model.onnx", "model.so", "report.json")}


def test_spec_is_named_by_its_own_file_and_what_it_extends(tmp_path, capsys):
    spec = tmp_path / "my.yaml"
    spec.write_text("kiln: 1\nextends: reparam\nverify: {samples: 1}\n")
    out = tmp_path / "out"
    assert main(["compile", str(EXAMPLE), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["spec"] == f"{spec} (extends reparam)"
    named = tmp_path / "named.yaml"
    named.write_text("kiln: 1\nname: mine\nextends: reparam\n")
    assert main(["compile", str(EXAMPLE), "--spec", str(named), "--no-build", "-q",
                 "-o", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["spec"] == "mine (extends reparam)"


def test_a_pass_undone_by_skip_pass_is_not_in_the_total(tmp_path):
    spec = tmp_path / "strict.yaml"
    spec.write_text("kiln: 1\ncalibration: {samples: 2}\npasses:\n  - fold_batchnorm\n"
                    "  - quantize: {budget: {sqnr_db: 200}}\n"
                    "verify: {samples: 2, on_budget_exceeded: skip_pass}\n")
    out = tmp_path / "out"
    assert main(["compile", str(EXAMPLE), "--spec", str(spec), "--no-build", "-q",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    fold, quantize = report["passes"]
    assert quantize["skipped"] and quantize["modified"] and not fold["skipped"]
    total = report["total"]
    assert total["modified"] == 1  # fold_batchnorm only
    assert total["sqnr_db"] == fold["sqnr_db_vs_source"] and total["sqnr_db"] > 100
    assert total["params_after"] == fold["params_after"]


# -- 6. a damaged or mixed artifact is refused before it is loaded -----------------------

def run_artifact_cli(folder: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    import numpy as np

    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.zeros((1, 3, 32, 32), np.float32))
    code = main(["run", str(folder), "--inputs", str(inputs)])
    return code, capsys.readouterr().err


def test_intact_artifact_runs(built, tmp_path, capsys):
    code, err = run_artifact_cli(built, tmp_path, capsys)
    assert code == 0, err


def test_truncated_library_is_refused_before_loading(built, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    library = folder / "model.so"
    library.write_bytes(library.read_bytes()[:4096])
    # in a subprocess: were it dlopen'ed, a truncated library could die with SIGBUS
    inputs = tmp_path / "in.npz"
    import numpy as np

    np.savez(inputs, x=np.zeros((1, 3, 32, 32), np.float32))
    code, err = kiln_subprocess(["run", str(folder), "--inputs", str(inputs)])
    assert code == 2, err
    assert err.strip() == (f"kiln: error: {library}: does not match manifest.json (changed, "
                           "damaged or from another build); rebuild the artifact")


def test_files_from_another_build_are_refused(built, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(built, folder)
    other = tmp_path / "other"
    assert main(["compile", str(EXAMPLE), "--spec", "fp32", "--no-build", "-q",
                 "-o", str(other)]) == 0
    shutil.copy(other / "model.onnx", folder / "model.onnx")
    code, err = run_artifact_cli(folder, tmp_path, capsys)
    assert code == 2
    assert "model.onnx: does not match manifest.json" in err and len(err.splitlines()) == 1


def test_library_and_manifest_alone_still_run(built, tmp_path, capsys):
    folder = tmp_path / "shipped"
    folder.mkdir()
    for name in ("model.so", "manifest.json"):  # what goes onto a device
        shutil.copy(built / name, folder / name)
    code, err = run_artifact_cli(folder, tmp_path, capsys)
    assert code == 0, err


def test_manifest_without_hashes_is_refused(built, tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    manifest["format"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_artifact_cli(folder, tmp_path, capsys)
    assert code == 2 and "manifest format 1 is not supported" in err and "rebuild" in err
