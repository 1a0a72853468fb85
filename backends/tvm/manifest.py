"""``manifest.json``: what a compiled artifact expects and how it was made.

Written next to ``model.so`` by :mod:`.build`, read by :mod:`.runtime` (and by
anything that ships the artifact) so the library can be called without the
original model: input/output names, shapes and dtypes in call order, the
target, and the versions and model+spec hash that produced it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.compiler.core.errors import KilnError

MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, static shape, numpy dtype name."""

    name: str
    shape: tuple[int, ...]
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
            if data.get("format") != FORMAT_VERSION:
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
