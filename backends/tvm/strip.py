"""Stripping cross-compiled libraries: an arm64 ``model.so`` keeps its full symbol table
from ``export_library`` (PP-OCR cls, fp32: 1.62 MB; 1.05 MB stripped). The runtime needs only
the dynamic symbols (``dlsym``), which ``strip --strip-unneeded`` keeps."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def strip_tool(cross_cc: str) -> str | None:
    """The toolchain's strip next to its compiler: ``aarch64-linux-gnu-gcc`` ->
    ``aarch64-linux-gnu-strip`` (None when it is not installed)."""
    name = Path(cross_cc).name
    for suffix in ("-gcc", "-cc", "-clang", "-g++"):
        if name.endswith(suffix):
            prefix = name[:-len(suffix)]
            tool = str(Path(cross_cc).with_name(f"{prefix}-strip")) if "/" in cross_cc \
                else f"{prefix}-strip"
            return shutil.which(tool)
    return None


def strip_library(path: Path, cross_cc: str) -> bool:
    """Strip ``path`` in place with the cross toolchain's strip; False (and a warning,
    the library left as it is) when there is no such strip or it fails."""
    tool = strip_tool(cross_cc)
    if tool is None:
        log.warning("no strip for %s: %s keeps its symbols (install binutils for the target)",
                    cross_cc, path.name)
        return False
    done = subprocess.run([tool, "--strip-unneeded", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("%s failed on %s (%s): the library keeps its symbols", tool, path.name,
                    done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no message")
        return False
    return True
