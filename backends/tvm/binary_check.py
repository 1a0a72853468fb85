"""Check that a compiled library is the kind of binary its target needs.

A wrong linker or a silently ignored target dict would otherwise surface only
on the device. The check reads the ELF header's ``e_machine`` (x86-64 vs
aarch64) and, for CUDA targets, looks for the device module TVM packs into the
library: TVM 0.27 stores CUDA kernels as CUDA C (compiled by NVRTC/nvcc when
the library is loaded on a GPU machine); PTX, cubin or fatbin are accepted too.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from kiln.compiler.core.errors import LoweringError

from .targets import ResolvedTarget, resolve_target

_ELF_MAGIC = b"\x7fELF"
_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64", 190: "cuda"}
_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_KERNEL_RE = re.compile(rb'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')
#: TVM serializes each imported module as <u64 length><kind>; the CUDA one is "cuda".
_CUDA_MODULE_KIND = struct.pack("<Q", 4) + b"cuda"


def elf_machine(data: bytes) -> str:
    """Architecture named by an ELF header ('x86_64', 'aarch64', ...)."""
    if len(data) < 20 or not data.startswith(_ELF_MAGIC):
        raise ValueError("not an ELF file")
    little = data[5] == 1
    (machine,) = struct.unpack("<H" if little else ">H", data[18:20])
    return _MACHINES.get(machine, f"e_machine={machine}")


def _device_code(data: bytes) -> str | None:
    """Describe the CUDA device code in a library's bytes, or None if there is none."""
    kernels = sorted({m.group(1).decode() for m in _KERNEL_RE.finditer(data)})
    if _CUDA_MODULE_KIND in data and kernels:
        return f"{len(kernels)} CUDA kernel(s) as CUDA C, compiled at load time"
    if _FATBIN_MAGIC in data:
        return "CUDA fatbin"
    if b".target sm_" in data and b".entry" in data:
        return "PTX"
    return None


def check_binary(path: Path | str, target: str | dict[str, Any] | ResolvedTarget) -> str:
    """Check ``path`` is a library for ``target``; return a one-line description.

    Raises LoweringError when the ELF architecture differs from the target's
    or a CUDA target's library holds no device code.
    """
    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    data = Path(path).read_bytes()
    try:
        machine = elf_machine(data)
    except ValueError as err:
        raise LoweringError(f"{path}: {err}", target=resolved.name) from err
    if machine != resolved.arch:
        raise LoweringError(f"{path} is an {machine} ELF, expected {resolved.arch}",
                            target=resolved.name)
    description = f"{machine} ELF shared library"
    if resolved.family == "cuda":
        device = _device_code(data)
        if device is None:
            raise LoweringError(f"{path} holds no CUDA device code", target=resolved.name)
        description += f" with {device}"
    return description
