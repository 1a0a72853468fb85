"""ONNX out: deterministic bytes, written atomically, never over the input model."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.atomic import write_atomic
from kiln.compiler.core.errors import OutputError

PRODUCER_NAME = "kiln"


def export_bytes(model: ir.Model, *, producer_version: str = "") -> bytes:
    """The model as ONNX bytes; the same model gives the same bytes (no timestamps)."""
    model.producer_name = PRODUCER_NAME
    model.producer_version = producer_version
    return kir.model_bytes(model)


def save_model(model: ir.Model, path: Path, *, protect: tuple[Path, ...] = (),
               producer_version: str = "", shown: Path | None = None) -> int:
    """Save as one self-contained .onnx file; returns its size in bytes.

    ``shown``: the name errors give the file (its final name when ``path`` is in a
    staging folder)."""
    data = export_bytes(model, producer_version=producer_version)
    if len(data) >= 2**31 - 1:
        raise OutputError(f"{shown or path}: model over 2 GiB; external data output is not "
                          "supported yet")
    write_atomic(path, data, protect=protect)
    return len(data)
