"""Atomic file writes: a reader never sees a half-written file, a failed write keeps the old.

Every artifact kiln writes (model.onnx, report.json/html, model.so, manifest.json, a run's
outputs) goes through a temporary file in the destination folder and ``os.replace``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from kiln.compiler.core.errors import OutputError

#: What ``open(path, "w")`` would give a new file (less the umask).
DEFAULT_MODE = 0o666


def current_umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomic(tmp: Path | str, path: Path | str, *, mode: int = DEFAULT_MODE) -> None:
    """Give ``tmp`` (a finished file next to ``path``) its final mode and rename it over ``path``.

    ``tempfile.mkstemp`` creates files 0600; ``mode`` (less the umask) is what a plainly
    written file would have (0o755 for a shared library).
    """
    os.chmod(tmp, mode & ~current_umask())
    os.replace(tmp, path)


def _refuse_protected(path: Path, protect: tuple[Path, ...]) -> None:
    for other in protect:
        try:
            if path.exists() and other.exists() and path.resolve() == Path(other).resolve():
                raise OutputError(f"{path}: refusing to write over the input model")
        except OSError:
            pass


def write_atomic(path: Path | str, data: bytes, *, protect: tuple[Path, ...] = (),
                 mode: int = DEFAULT_MODE) -> None:
    """Write ``data`` to ``path`` through a temporary file in its folder and a rename.

    ``protect`` lists files that must never be written over (the input model):
    OutputError if ``path`` is one of them. The folder is created if missing.
    """
    path = Path(path)
    _refuse_protected(path, protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_atomic(tmp, path, mode=mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: errno, phrases a tool prints for it (a linker's message), and how kiln names it.
_WRITE_FAULTS = (
    (errno.ENOSPC, ("no space left on device",), "no space left on device"),
    (errno.EFBIG, ("file too large", "file size limit exceeded"), "file size limit exceeded"),
    (errno.EDQUOT, ("disk quota exceeded",), "disk quota exceeded"),
)


def write_fault(error: BaseException) -> str | None:
    """``"no space left on device"`` (or the file size limit, the quota) when ``error`` (its
    errno, or its text: a linker's message) says the disk refused the write, else None."""
    code = getattr(error, "errno", None)
    text = str(error).lower()
    for number, phrases, cause in _WRITE_FAULTS:
        if code == number or any(phrase in text for phrase in phrases):
            return cause
    return None


def write_error(shown: Path | str, error: OSError) -> OutputError:
    """The one-line OutputError for a failed write of the file the user knows as ``shown``
    (the final name, not the temporary file that was being written)."""
    cause = write_fault(error)
    if cause is not None:
        return OutputError(f"{cause} writing {shown}")
    return OutputError(f"{shown}: cannot write output ({error.strerror or error})")
