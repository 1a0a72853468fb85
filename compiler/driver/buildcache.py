"""kiln as a build step: a content key for a compile, ``--check``, and the build cache.

The **key** of a compile is the SHA-256 of everything its outputs depend on:

- ``model``: the model file's bytes, and the external-data files an ONNX model names;
- ``spec``: the loaded spec (``extends`` resolved, every default written), and the bytes of
  every file or folder it names (``npz:``/``folder:`` calibration, ``verify.inputs``, a pass
  option such as a mask or adapter file), found beside the spec or from the working folder;
- ``target``: the target, and for ``host`` this CPU (its model name, its feature flags and
  ``KILN_HOST_MCPU``), so another machine never reuses this one's kernels;
- ``inputs``: ``--input``/``--dim`` bindings; ``options``: ``--no-build``, ``--tune``,
  ``--tuning-db``;
- ``kiln``: kiln's version and a digest of its own code and data files (a developer's edit
  changes the key), with the versions of TVM, ONNX, ONNX Runtime, onnx-ir and NumPy.

A model given as a Python callable, or calibration from one (``module:function``), has no
key: its outputs depend on code kiln cannot see. Such compiles always run, and ``--check``
says why it cannot tell.

``OUTDIR/inputs.json`` records the key, its parts and the SHA-256 of each file the compile
wrote (it is one of OUTDIR's kiln files, committed with the others). ``kiln compile --check``
recomputes the key and compares: exit 0 when OUTDIR is current, 1 when stale (naming the part
that changed, or the file that was edited or removed), nothing written.

The **cache** (``--cache DIR``, default ``$XDG_CACHE_HOME/kiln/builds``, ``--no-cache`` or
``KILN_BUILD_CACHE=off`` to skip it) holds one folder per key: a compile whose key is there
copies the files into OUTDIR (all or nothing, like a build) instead of compiling. Entries are checked
against their ``inputs.json`` digests before use (a damaged one is dropped) and written by
rename, so a cache shared by parallel builds never serves half an entry. A cache that cannot
be written only costs the next build its time (a warning, never an error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.compiler.core.digest import file_sha256
from kiln.compiler.core.spec import Spec
from kiln.compiler.core.spec.emit import dump_spec
from kiln.compiler.core.version import kiln_version

logger = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"
FORMAT = 1
_DEPENDENCIES = ("apache-tvm", "tvm", "onnx", "onnxruntime", "onnx-ir", "numpy")
_CODE_SUFFIXES = (".py", ".yaml", ".json", ".onnx")


@dataclass(frozen=True)
class BuildKey:
    key: str
    parts: dict[str, str]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_sha(root: Path, suffixes: tuple[str, ...] | None = None) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if suffixes is not None and path.suffix not in suffixes:
            continue
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def kiln_code_digest() -> str:
    """Digest of kiln's installed code and data (compiler, passes, backends, specs)."""
    import kiln.backends
    import kiln.compiler
    import kiln.passes
    import kiln.specs

    parts = []
    for package in (kiln.compiler, kiln.passes, kiln.backends, kiln.specs):
        for root in sorted(set(package.__path__)):
            parts.append(f"{package.__name__}:{_tree_sha(Path(root), _CODE_SUFFIXES)}")
    versions = []
    for name in _DEPENDENCIES:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return _sha("\n".join([kiln_version(), *parts, *versions]).encode())


def _model_digest(path: Path) -> str:
    digest = hashlib.sha256(file_sha256(path).encode())
    if path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # a corrupt model: the compile itself reports it
            return digest.hexdigest()
        locations = set()
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
        for location in sorted(locations):
            data = path.parent / location
            digest.update(location.encode() + b"\0")
            digest.update((file_sha256(data) if data.is_file() else "missing").encode())
    return digest.hexdigest()


def _host_identity() -> str:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags", "Features", "CPU part") and name not in fields:
                fields[name] = value.strip()
    except OSError:
        pass
    import platform

    fields["machine"] = platform.machine()
    fields["KILN_HOST_MCPU"] = os.environ.get("KILN_HOST_MCPU", "")
    return _sha(json.dumps(fields, sort_keys=True).encode())


def _referenced_files(spec: Spec) -> tuple[str, str | None]:
    """Digest of the files and folders the spec names, or (_, why there is no key)."""
    data = spec.model_dump(mode="json", exclude_none=True)
    source = (data.get("calibration") or {}).get("source", "random")
    if source != "random" and not str(source).startswith(("npz:", "folder:")):
        return "", f"calibration comes from a Python callable ({source})"
    bases = [Path.cwd()]
    if spec.source and Path(spec.source).is_file():
        bases.insert(0, Path(spec.source).resolve().parent)
    found: dict[str, str] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value and len(value) < 4096:
            folder = value.startswith("folder:")
            text = value.split(":", 1)[1] if value.startswith(("npz:", "folder:")) else value
            for i, base in enumerate(bases):   # beside the spec first, then the working folder
                try:
                    path = (base / text)
                    # a folder only where the spec names one (folder: calibration): any other
                    # string that happens to name a folder is not walked
                    if path.is_file():
                        found[f"{i}|{text}"] = file_sha256(path)
                    elif folder and path.is_dir():
                        found[f"{i}|{text}"] = _tree_sha(path)
                except (OSError, ValueError):
                    continue

    visit(data)
    return _sha(json.dumps(found, sort_keys=True).encode()), None


def build_key(model: str | os.PathLike, spec: Spec, *, target: Any,
              input_shapes: Any = None, options: dict[str, Any] | None = None
              ) -> tuple[BuildKey | None, str | None]:
    """The compile's key, or (None, why it has none)."""
    path = Path(model)
    if not path.is_file():
        return None, f"the model {str(model)!r} is not a file (a Python callable?)"
    files, why = _referenced_files(spec)
    if why is not None:
        return None, why
    target_text = json.dumps(target, sort_keys=True, default=str)
    if target in ("host", None) or (isinstance(target, str) and target.startswith("host")):
        target_text += "|" + _host_identity()
    parts = {
        "model": _model_digest(path),
        "spec": _sha(dump_spec(spec).split("\n", 1)[-1].encode()),
        "spec_files": files,
        "target": _sha(target_text.encode()),
        "inputs": _sha(json.dumps(input_shapes, sort_keys=True, default=str).encode()),
        "options": _sha(json.dumps(options or {}, sort_keys=True, default=str).encode()),
        "kiln": kiln_code_digest(),
    }
    return BuildKey(_sha(json.dumps(parts, sort_keys=True).encode()), parts), None


def write_inputs(folder: Path, key: BuildKey) -> None:
    """``inputs.json`` into a staging folder: the key, its parts and each file's digest."""
    files = {name: file_sha256(folder / name) for name in sorted(os.listdir(folder))
             if not name.startswith(".") and name != INPUTS_FILE and (folder / name).is_file()}
    record = {"format": FORMAT, "key": key.key, "parts": key.parts, "files": files}
    (folder / INPUTS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _files_intact(folder: Path, record: dict) -> str | None:
    """None when every recorded file is there with its digest, else the first one that is not."""
    for name, digest in sorted(dict(record.get("files") or {}).items()):
        path = folder / name
        if not path.is_file():
            return f"{name} was removed"
        if file_sha256(path) != digest:
            return f"{name} was changed since it was written"
    return None


def check_outdir(outdir: Path, key: BuildKey) -> tuple[bool, str]:
    """(current, why): whether OUTDIR holds the outputs of exactly this compile."""
    record = _read_record(outdir)
    if record is None:
        return False, f"{outdir / INPUTS_FILE} is missing or unreadable (no keyed build there)"
    if record.get("key") != key.key:
        old = record.get("parts") or {}
        changed = [name for name, value in key.parts.items() if old.get(name) != value]
        return False, f"changed since the build: {', '.join(changed) or 'the key'}"
    damaged = _files_intact(outdir, record)
    if damaged is not None:
        return False, damaged
    return True, "up to date"


def default_cache_dir() -> Path | None:
    """``$KILN_BUILD_CACHE_DIR`` or ``$XDG_CACHE_HOME/kiln/builds``; None when
    ``KILN_BUILD_CACHE=off``."""
    if os.environ.get("KILN_BUILD_CACHE", "").lower() in ("off", "0", "no", "false"):
        return None
    if os.environ.get("KILN_BUILD_CACHE_DIR"):
        return Path(os.environ["KILN_BUILD_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kiln" / "builds"


def _entry(cache: Path, key: BuildKey) -> Path:
    return cache / key.key[:2] / key.key


def lookup(cache: Path, key: BuildKey) -> Path | None:
    """The cache entry for ``key`` when it is there and intact (a damaged one is removed)."""
    entry = _entry(cache, key)
    record = _read_record(entry)
    if record is None or record.get("key") != key.key:
        return None
    damaged = _files_intact(entry, record)
    if damaged is not None:
        logger.warning("build cache entry %s dropped: %s", entry, damaged)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return entry


def store(cache: Path, key: BuildKey, outdir: Path) -> Path | None:
    """Copy OUTDIR's keyed build into the cache (whole entry by one rename)."""
    entry = _entry(cache, key)
    record = _read_record(outdir)
    if entry.exists() or record is None or record.get("key") != key.key:
        return None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".incoming-", dir=entry.parent))
        try:
            for name in [*sorted(record["files"]), INPUTS_FILE]:
                shutil.copyfile(outdir / name, scratch / name)
            os.replace(scratch, entry)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if entry.exists():   # another build stored the same key first
                return entry
            raise
    except OSError as error:
        logger.warning("build cache %s not written (%s): the next build will compile again",
                       cache, error.strerror or error)
        return None
    return entry


def copy_entry(entry: Path, staging: Path) -> None:
    """Copy a cache entry's files into a staging folder (``OutputFolder.staging``)."""
    record = _read_record(entry)
    assert record is not None
    for name in [*sorted(record["files"]), INPUTS_FILE]:
        shutil.copyfile(entry / name, staging / name)
