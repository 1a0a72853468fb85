"""Named compile targets: each is a TVM target dict plus the toolchain that links it.

A spec's ``target:`` is either one of these names or a raw TVM target dict
(``{"kind": "llvm", "mcpu": "znver4"}``); :func:`resolve_target` turns either
into a :class:`ResolvedTarget`.

=============  ==========================================================  ==================
name           TVM target                                                  linked with
=============  ==========================================================  ==================
``host``       ``{"kind": "llvm", "mcpu": <detected>}`` (znver4,           system ``cc``
               sapphirerapids, skylake-avx512, haswell, ... or x86-64)
``x86-64-v3``  ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu",           system ``cc``
               "mcpu": "x86-64-v3"}`` (AVX2 + FMA, any x86 since ~2015)
``x86-64-v4``  same with ``"mcpu": "x86-64-v4"`` (AVX-512 F/BW/CD/DQ/VL)   system ``cc``
``arm64``      ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu",          ``aarch64-linux-
               "mattr": ["+neon"]}``                                       gnu-gcc``
``cuda-sm80``  ``{"kind": "cuda", "arch": "sm_80", "host": <host>}``       system ``cc``
``cuda-sm90``  ``{"kind": "cuda", "arch": "sm_90", "host": <host>}``       system ``cc``
=============  ==========================================================  ==================

Why a real CPU name for ``host``: TVM's LLVM ignores ``mcpu: native`` (the
wheel's LLVM reports a conda triple it then rejects), so the CPU is detected
here from TVM's own LLVM query or ``/proc/cpuinfo`` flags.

CUDA targets build with no GPU present: TVM 0.27 stores the generated CUDA C
kernels in the library and compiles them when the library is loaded on a GPU
machine (``nvcc`` or NVRTC is needed there, not at build time).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from kiln.compiler.core.errors import KilnError

logger = logging.getLogger(__name__)

#: Debian package that provides the arm64 cross linker.
CROSS_GCC_PACKAGE = "gcc-aarch64-linux-gnu"


@dataclass(frozen=True)
class TargetPreset:
    """One named target: the TVM dict, the linker, and the build family.

    ``family`` selects the build pipeline's phases ("cpu" or "cuda");
    ``cross_cc`` names the compiler that links the exported library when it
    is not the host's; ``arch`` is the CPU architecture the library runs on.
    ``host`` and the CUDA targets' host side are filled in at resolve time.
    """

    name: str
    description: str
    family: str
    target: dict[str, Any] = field(default_factory=dict)
    cross_cc: str | None = None
    arch: str = "x86_64"


@dataclass(frozen=True)
class ResolvedTarget:
    """A target ready to build for: name, full TVM dict, linker, family."""

    name: str
    target: dict[str, Any]
    family: str
    cross_cc: str | None
    arch: str

    def tvm_target(self):
        """The ``tvm.target.Target`` for this dict (import is deferred: TVM is heavy)."""
        import tvm

        return tvm.target.Target(copy.deepcopy(self.target))

    @property
    def device_kind(self) -> str:
        """'cpu' or 'cuda': where the compiled model's tensors live."""
        return "cuda" if self.family == "cuda" else "cpu"

    def runs_on_this_host(self) -> bool:
        """Whether an artifact for this target can be loaded and run here."""
        if self.arch != host_arch():
            return False
        if self.family == "cuda":
            return cuda_device_present()
        return True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "family": self.family,
                "cross_cc": self.cross_cc, "arch": self.arch}


TARGETS: dict[str, TargetPreset] = {
    "host": TargetPreset(
        "host", "this machine's CPU (detected LLVM mcpu)", "cpu", {"kind": "llvm"}),
    "x86-64-v3": TargetPreset(
        "x86-64-v3", "any x86-64 with AVX2+FMA", "cpu",
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}),
    "x86-64-v4": TargetPreset(
        "x86-64-v4", "any x86-64 with AVX-512 (F/BW/CD/DQ/VL)", "cpu",
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}),
    "arm64": TargetPreset(
        "arm64", "64-bit ARM Linux (NEON), cross-linked", "cpu",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        cross_cc="aarch64-linux-gnu-gcc", arch="aarch64"),
    "cuda-sm80": TargetPreset(
        "cuda-sm80", "NVIDIA Ampere (A100), host CPU side detected", "cuda",
        {"kind": "cuda", "arch": "sm_80"}),
    "cuda-sm90": TargetPreset(
        "cuda-sm90", "NVIDIA Hopper (H100/H200), host CPU side detected", "cuda",
        {"kind": "cuda", "arch": "sm_90"}),
}


def host_arch() -> str:
    """'x86_64' or 'aarch64' (the machine this process runs on)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU listed in /proc/cpuinfo."""
    vendor, flags = "", set()
    try:
        text = path.read_text()
    except OSError:
        return vendor, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def cpu_from_flags(vendor: str, flags: set[str]) -> str:
    """Map x86 feature flags to the most specific LLVM CPU name we trust.

    Ordered from newest to oldest feature sets; ``x86-64`` if nothing matches.
    """
    amd = "AMD" in vendor
    if {"avx512f", "avx512_bf16", "avx512_vnni"} <= flags and amd:
        return "znver4"
    if {"amx_tile", "avx512f"} <= flags:
        return "sapphirerapids"
    if {"avx512f", "avx512_vnni", "avx512vbmi"} <= flags:
        return "icelake-server"
    if {"avx512f", "avx512bw"} <= flags:
        return "skylake-avx512"
    if {"avx2", "fma"} <= flags:
        if amd:
            return "znver3" if "vaes" in flags else "znver2" if "clwb" in flags else "znver1"
        return "haswell"
    if "avx" in flags:
        return "sandybridge"
    return "x86-64"


#: Environment variable that overrides the detected ``host`` CPU, e.g.
#: ``KILN_HOST_MCPU=x86-64-v3`` builds and tests the AVX2 path on an AVX-512 machine
#: (it must name a CPU whose instructions this machine can run).
HOST_MCPU_ENV = "KILN_HOST_MCPU"


def detect_host_cpu() -> str:
    """LLVM mcpu name for this machine's CPU (or ``$KILN_HOST_MCPU`` when set).

    Prefers LLVM's own answer (through TVM) when it is a specific CPU name,
    else maps /proc/cpuinfo flags; ``generic`` on non-x86 machines.
    """
    forced = os.environ.get(HOST_MCPU_ENV, "").strip()
    if not forced:
        return _detected_host_cpu()
    if forced not in _llvm_cpu_names():
        raise KilnError(f"{HOST_MCPU_ENV}={forced!r} is not a CPU LLVM knows "
                        "(e.g. x86-64-v3, x86-64-v4, haswell, znver3)")
    return forced


@lru_cache(maxsize=4)
def _llvm_cpu_names(triple: str = "") -> frozenset[str]:
    """CPU names LLVM accepts for ``triple`` (default: this machine's architecture)."""
    import tvm
    from tvm.target import codegen

    if not triple:
        triple = "aarch64-linux-gnu" if host_arch() == "aarch64" else "x86_64-linux-gnu"
    target = tvm.target.Target({"kind": "llvm", "mtriple": triple})
    return frozenset(str(name) for name in codegen.llvm_get_cpu_archlist(target))


@lru_cache(maxsize=1)
def _detected_host_cpu() -> str:
    if host_arch() != "x86_64":
        return "generic"
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except Exception:  # TVM missing or built without LLVM: fall back to flags
        name = ""
    if name and name not in ("generic", "x86-64"):
        return name
    vendor, flags = _cpuinfo_flags()
    return cpu_from_flags(vendor, flags)


def host_target_dict() -> dict[str, Any]:
    """The TVM dict for this machine's CPU."""
    if host_arch() == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    return {"kind": "llvm", "mcpu": detect_host_cpu()}


@lru_cache(maxsize=1)
def cuda_device_present() -> bool:
    """Whether a CUDA GPU is visible to TVM's runtime in this process."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def _known() -> str:
    return ", ".join(TARGETS)


def resolve_target(name_or_dict: str | dict[str, Any]) -> ResolvedTarget:
    """Turn a preset name or a raw TVM target dict into a :class:`ResolvedTarget`.

    Raw dicts are checked by TVM; their family follows ``kind`` (``cuda`` or a
    CPU ``llvm``); an ``llvm`` dict whose ``mtriple`` starts with ``aarch64``
    is linked with the arm64 cross compiler.
    """
    if isinstance(name_or_dict, str):
        preset = TARGETS.get(name_or_dict)
        if preset is None:
            raise KilnError(f"unknown target {name_or_dict!r}; known targets: {_known()} "
                            "(or give a TVM target dict)")
        target = copy.deepcopy(preset.target)
        if preset.name == "host":
            target = host_target_dict()
        elif preset.family == "cuda":
            target["host"] = host_target_dict()
        arch = host_arch() if preset.name == "host" else preset.arch
        # on a machine of the target's own architecture the system compiler links it
        cross_cc = None if arch == host_arch() else preset.cross_cc
        return ResolvedTarget(preset.name, target, preset.family, cross_cc, arch)
    if not isinstance(name_or_dict, dict) or "kind" not in name_or_dict:
        raise KilnError(f"target must be a preset name ({_known()}) or a TVM target dict "
                        f"with a 'kind', got {name_or_dict!r}")
    target = copy.deepcopy(name_or_dict)
    kind = target["kind"]
    if kind == "cuda":
        target.setdefault("host", host_target_dict())
        family, cross_cc, arch = "cuda", None, host_arch()
    elif kind == "llvm":
        family = "cpu"
        triple = str(target.get("mtriple", ""))
        if triple.startswith("aarch64"):
            cross_cc = None if host_arch() == "aarch64" else TARGETS["arm64"].cross_cc
            arch = "aarch64"
        else:
            cross_cc, arch = None, host_arch() if not triple else triple.split("-")[0]
    else:
        raise KilnError(f"target kind {kind!r} is not supported by kiln's TVM backend "
                        "(use 'llvm' or 'cuda')")
    mcpu = target.get("mcpu")
    if kind == "llvm" and isinstance(mcpu, str) and mcpu not in _llvm_cpu_names(
            str(target.get("mtriple", ""))):  # LLVM would warn per kernel and build generic code
        raise KilnError(f"target mcpu {mcpu!r} is not a CPU LLVM knows for "
                        f"{target.get('mtriple') or host_arch()} (e.g. x86-64-v3, znver4, "
                        "cortex-a76; 'host' targets this machine)")
    try:
        import tvm

        tvm.target.Target(copy.deepcopy(target))
    except Exception as err:
        raise KilnError(f"invalid TVM target {json.dumps(name_or_dict)}: {err}") from err
    name = json.dumps(target, sort_keys=True)
    return ResolvedTarget(name, target, family, cross_cc, arch)


def require_cross_compiler(target: ResolvedTarget) -> str | None:
    """Path of the linker for ``target`` (None: TVM's default host compiler).

    Raises KilnError with the install command when the cross compiler is missing.
    """
    if target.cross_cc is None:
        return None
    path = shutil.which(target.cross_cc)
    if path is None:
        raise KilnError(f"target {target.name!r} links with {target.cross_cc}, which is not "
                        f"installed: run `apt-get install {CROSS_GCC_PACKAGE}` "
                        "(or tools/edge/install_cross.sh)")
    return path
