"""ONNX out: deterministic bytes, written atomically, never over the input model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import OutputError

PRODUCER_NAME = "kiln"


def export_bytes(model: ir.Model, *, producer_version: str = "") -> bytes:
    """The model as ONNX bytes; the same model gives the same bytes (no timestamps)."""
    model.producer_name = PRODUCER_NAME
    model.producer_version = producer_version
    return kir.model_bytes(model)


def write_atomic(path: Path, data: bytes, *, protect: tuple[Path, ...] = ()) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    ``protect`` lists files that must never be written over (the input model).
    """
    path = Path(path)
    for other in protect:
        try:
            if path.exists() and other.exists() and path.resolve() == Path(other).resolve():
                raise OutputError(f"{path}: refusing to write over the input model")
        except OSError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_model(model: ir.Model, path: Path, *, protect: tuple[Path, ...] = (),
               producer_version: str = "") -> int:
    """Save as one self-contained .onnx file; returns its size in bytes."""
    data = export_bytes(model, producer_version=producer_version)
    if len(data) >= 2**31 - 1:
        raise OutputError(f"{path}: model over 2 GiB; external data output is not supported yet")
    write_atomic(path, data, protect=protect)
    return len(data)
