"""Target presets: names, host detection, raw dicts, missing cross compiler."""

from __future__ import annotations

import pytest

from kiln.backends.tvm import TARGETS, resolve_target
from kiln.backends.tvm import targets as targets_module
from kiln.backends.tvm.targets import cpu_from_flags, require_cross_compiler
from kiln.compiler.core.errors import KilnError


def test_every_preset_resolves_to_a_valid_tvm_target():
    for name in TARGETS:
        resolved = resolve_target(name)
        assert resolved.name == name
        resolved.tvm_target()  # TVM accepts the dict
    assert resolve_target("cuda-sm90").target["arch"] == "sm_90"
    assert resolve_target("cuda-sm90").target["host"]["kind"] == "llvm"
    assert resolve_target("arm64").cross_cc == "aarch64-linux-gnu-gcc"


def test_host_gets_a_real_cpu_name():
    mcpu = resolve_target("host").target.get("mcpu")
    assert mcpu and mcpu != "native"


def test_unknown_target_lists_presets():
    with pytest.raises(KilnError) as info:
        resolve_target("tpu-v9")
    message = str(info.value)
    assert "tpu-v9" in message
    for name in ("host", "arm64", "cuda-sm90", "x86-64-v3"):
        assert name in message


def test_raw_dict_target():
    resolved = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert resolved.family == "cpu" and resolved.arch == "aarch64"
    assert resolve_target({"kind": "cuda", "arch": "sm_80"}).family == "cuda"
    with pytest.raises(KilnError, match="not supported"):
        resolve_target({"kind": "vulkan"})


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", {"avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma"}, "znver4"),
    ("GenuineIntel", {"avx512f", "avx512bw", "avx2", "fma"}, "skylake-avx512"),
    ("GenuineIntel", {"avx2", "fma", "avx"}, "haswell"),
    ("GenuineIntel", {"sse2"}, "x86-64"),
])
def test_cpu_from_flags(vendor, flags, expected):
    assert cpu_from_flags(vendor, flags) == expected


def test_missing_cross_compiler_says_how_to_install(monkeypatch):
    monkeypatch.setattr(targets_module.shutil, "which", lambda name: None)
    with pytest.raises(KilnError, match="apt-get install gcc-aarch64-linux-gnu"):
        require_cross_compiler(resolve_target("arm64"))


def test_host_cpu_can_be_forced_to_the_avx2_path(monkeypatch):
    """KILN_HOST_MCPU makes ``host`` build for another CPU (an AVX-512 machine testing the
    AVX2 path); unset, ``host`` is the detected CPU again."""
    monkeypatch.setenv(targets_module.HOST_MCPU_ENV, "x86-64-v3")
    assert resolve_target("host").target["mcpu"] == "x86-64-v3"
    monkeypatch.delenv(targets_module.HOST_MCPU_ENV)
    assert resolve_target("host").target["mcpu"] == targets_module.detect_host_cpu() != ""


def test_unknown_forced_host_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(targets_module.HOST_MCPU_ENV, "bogus-cpu")
    with pytest.raises(KilnError, match="KILN_HOST_MCPU='bogus-cpu' is not a CPU LLVM knows"):
        resolve_target("host")


def test_cli_refuses_a_bad_forced_host_cpu_before_writing(monkeypatch, tmp_path, capsys):
    from kiln.compiler.core.example_models import EXAMPLE_PATH
    from kiln.compiler.driver.cli import main

    monkeypatch.setenv(targets_module.HOST_MCPU_ENV, "bogus-cpu")
    out = tmp_path / "out"
    assert main(["compile", str(EXAMPLE_PATH), "--spec", "fp32", "--target", "host",
                 "-o", str(out)]) == 2
    assert "KILN_HOST_MCPU='bogus-cpu'" in capsys.readouterr().err
    assert not out.exists()


def test_raw_target_with_an_unknown_mcpu_is_refused_before_writing(tmp_path, capsys):
    """LLVM would warn once per kernel and build generic code; kiln refuses it up front."""
    from kiln.compiler.core.example_models import EXAMPLE_PATH
    from kiln.compiler.driver.cli import main

    with pytest.raises(KilnError, match="mcpu 'bogus' is not a CPU LLVM knows"):
        resolve_target({"kind": "llvm", "mcpu": "bogus"})
    assert resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                           "mcpu": "cortex-a76"}).arch == "aarch64"
    out = tmp_path / "out"
    assert main(["compile", str(EXAMPLE_PATH), "--spec", "fp32",
                 "--target", '{"kind": "llvm", "mcpu": "bogus"}', "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--target: target mcpu 'bogus'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
