"""SHA-256 digests of shipped files, and the one model hash kiln reports.

The **model hash** (``model_hash`` in report.json and manifest.json) identifies what a
build shipped: the SHA-256 of the ``sha256sum`` listing of its model files
(:data:`MODEL_FILES` present in the output folder: ``model.onnx``, ``model.so``), names
sorted. From a shell, in the output folder::

    sha256sum $(ls model.onnx model.so 2>/dev/null) | sha256sum

prints it (``sha256:`` + that hex digest is the value kiln writes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

#: The files a model hash covers (whichever of them a build wrote).
MODEL_FILES = ("model.onnx", "model.so")
_CHUNK = 1 << 20


def file_sha256(path: Path | str) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_hash(digests: Mapping[str, str]) -> str:
    """``sha256:<hex>`` over the ``sha256sum`` lines of the model files among ``digests``
    (file name -> hex SHA-256), sorted by name (see the module docstring)."""
    listing = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests)
                      if name in MODEL_FILES)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
