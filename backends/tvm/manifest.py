"""``manifest.json``: what a compiled artifact expects and how it was made.

Written next to ``model.so`` by :mod:`.build`, read by :mod:`.runtime` (and by
anything that ships the artifact) so the library can be called without the
original model: input/output names, shapes and dtypes in call order, the
target, the versions that produced it, and the SHA-256 of every file of the
build (``files``: model.so, and model.onnx, report.json... when the driver wrote
them) with the build's model hash (:mod:`kiln.compiler.core.digest`).
:func:`check_files` compares them with the folder before the library is loaded,
so a folder mixing two builds, or a truncated ``model.so``, is refused in one line
instead of being dlopen'ed (a truncated library dies with SIGBUS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.compiler.core.atomic import write_atomic
from kiln.compiler.core.digest import file_sha256
from kiln.compiler.core.errors import KilnError

#: the library function computing weights once at load time (no arguments, returns a
#: tuple passed to ``main`` after the inputs: :mod:`kiln.backends.tvm.load_time`); here,
#: not there, so the runtime reads them without importing TVM's compiler (arm64 runtime)
LOAD_TIME_INIT = "kiln_init"
#: ``manifest.extra`` key: how many weights :data:`LOAD_TIME_INIT` returns
LOAD_TIME_KEY = "load_time_weights"

MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
#: 2: ``files`` (name -> SHA-256) added; a format-1 folder cannot be checked: rebuild it.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape, numpy dtype name. A symbolic dim is its name
    (``W``; an output's may be an expression of them, ``W // 4``); the manifest's
    ``dims`` gives each symbol's range."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def describe(self) -> str:
        """``[1,3,32,32] float32`` (the form error messages use)."""
        return f"[{','.join(str(d) for d in self.shape)}] {self.dtype}"


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``."""

    target_name: str
    target: dict[str, Any]
    target_family: str
    target_arch: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_hash: str
    kiln_version: str
    tvm_version: str
    library: str = LIBRARY_NAME
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: file name (in the artifact's folder) -> hex SHA-256 of its bytes
    files: dict[str, str] = field(default_factory=dict)
    #: symbolic dim -> [lo, hi]: the sizes one build serves (empty: every shape static)
    dims: dict[str, list[int]] = field(default_factory=dict)

    def with_files(self, folder: Path, names: list[str], *, model_hash: str | None = None
                   ) -> Manifest:
        """This manifest also covering ``names`` in ``folder`` (their SHA-256 now)."""
        files = dict(self.files)
        files.update({name: file_sha256(Path(folder) / name) for name in names})
        return replace(self, files=dict(sorted(files.items())),
                       model_hash=self.model_hash if model_hash is None else model_hash)

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("inputs", "outputs"):
            data[key] = [{"name": t["name"], "shape": list(t["shape"]), "dtype": t["dtype"]}
                         for t in data[key]]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
            data["inputs"] = tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"])
                                   for t in data["inputs"])
            data["outputs"] = tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"])
                                    for t in data["outputs"])
            if data.get("format") != FORMAT_VERSION or \
                    not isinstance(data.get("files"), Mapping):
                raise KilnError(f"{source}: manifest format {data.get('format')!r} is not "
                                f"supported (expected {FORMAT_VERSION}); rebuild the artifact")
            return cls(**data)
        except KilnError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise KilnError(f"{source}: not a kiln manifest ({err})") from err


def read_manifest(outdir: Path) -> Manifest:
    """The manifest of the artifact in ``outdir`` (KilnError if missing or malformed)."""
    path = Path(outdir) / MANIFEST_NAME
    if not path.is_file():
        raise KilnError(f"{outdir}: no {MANIFEST_NAME} (not a kiln build output)")
    return Manifest.from_json(path.read_text(), source=str(path))


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically; returns its path."""
    path = Path(folder) / MANIFEST_NAME
    write_atomic(path, manifest.to_json().encode())
    return path


def check_files(outdir: Path, manifest: Manifest) -> None:
    """KilnError (one line) unless the library and every other file the manifest covers
    that is in ``outdir`` have the recorded SHA-256. Only the library must be there: an
    artifact shipped as ``model.so`` + ``manifest.json`` alone loads."""
    outdir = Path(outdir)
    if manifest.library not in manifest.files:
        raise KilnError(f"{outdir / MANIFEST_NAME}: does not record {manifest.library}'s "
                        "hash; rebuild the artifact")
    for name, want in manifest.files.items():
        path = outdir / name
        if not path.is_file():
            if name != manifest.library:
                continue  # not shipped (the report, the ONNX model): nothing to mix up
            raise KilnError(f"{path}: missing (listed in {MANIFEST_NAME}); the folder is "
                            "incomplete: rebuild it")
        if file_sha256(path) != want:
            raise KilnError(f"{path}: does not match {MANIFEST_NAME} (changed, damaged or "
                            "from another build); rebuild the artifact")
