"""Loading a spec: YAML -> ``Spec``, every problem a ``SpecError`` naming the file, the line
and the key path.

``load_spec(name_or_path, config_for=...)`` reads YAML keeping every key's line, resolves
``extends:`` (maps merged, lists replaced), validates the sections with pydantic and each
pass's options with that pass's config class, found by ``config_for(name)``.

Why a lookup is passed in: the pass registry (name -> pass, imported lazily) belongs to the
driver, which ties passes to the core; the core must not import passes, not even by name
through the registry. So the driver hands its lookup to the loader
(``kiln.compiler.driver.specs.load_spec``), and anything else that loads specs (a test, a
tool with its own passes) can pass a lookup of its own. The options are typed here, at
load, so a loaded spec is complete: nothing downstream validates YAML again, and it can
be written back out (``emit``).
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kiln.compiler.core.errors import KilnError, SpecError
from kiln.compiler.core.pass_api import PassConfig
from kiln.compiler.core.spec.located_yaml import KeyPath, Locations, compose, format_path
from kiln.compiler.core.spec.schema import (
    SPEC_VERSION,
    Budget,
    Calibration,
    Output,
    ParamCondition,
    PassEntry,
    Selector,
    SelectorBase,
    Spec,
    Tune,
    Verify,
    attach_locations,
    pass_item_fields,
    sample_memory_problem,
)

#: A pass name -> its config class; raises KilnError (the message says why) for a name it
#: does not know. The driver's is ``kiln.compiler.driver.registry.config_class``.
ConfigLookup = Callable[[str], type[PassConfig]]


def builtin_specs() -> dict[str, Path]:
    """Built-in spec names -> files (``specs/*.yaml``)."""
    folder = resources.files("kiln.specs")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir()
            if p.name.endswith(".yaml")}


def _resolve(ref: str, relative_to: Path | None) -> Path:
    candidates = []
    path = Path(ref)
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    candidates.append(path)
    for candidate in candidates:
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    builtin = builtin_specs()
    if ref in builtin:
        return builtin[ref]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(ref, builtin, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpecError(f"no spec file or built-in spec named {ref!r}{hint}; "
                    f"built-in: {', '.join(sorted(builtin))}")


def _merge(base: Any, override: Any) -> Any:
    """Maps merged key by key, everything else (lists included) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return override


def _check_version(data: dict[Any, Any], locations: Locations, label: str | None) -> None:
    if "kiln" not in data:
        raise SpecError(f"missing version key (add `kiln: {SPEC_VERSION}` at the top)",
                        file=label, line=1)
    version = data["kiln"]
    # `type() is int`: YAML `true` is a bool, and True == 1 in Python.
    if type(version) is not int or version != SPEC_VERSION:
        file, line = locations.find(("kiln",))
        raise SpecError(f"spec version {version!r} is not supported "
                        f"(this kiln reads version {SPEC_VERSION})", file=file or label,
                        line=line, path="kiln")


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Locations]:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"cannot read spec ({error.strerror})", file=label) from None
    except UnicodeDecodeError:
        raise SpecError("not a text file", file=label) from None
    data, locations = compose(text, label)
    if data is None:
        raise SpecError("the spec is empty (expected at least `kiln: 1`)", file=label)
    if not isinstance(data, dict):
        raise SpecError("a spec must be a mapping of keys (kiln:, passes:, ...)", file=label,
                        line=1)
    _check_version(data, locations, label)
    parent_ref = data.get("extends")
    if parent_ref is None:
        return data, locations
    if not isinstance(parent_ref, str):
        _, line = locations.find(("extends",))
        raise SpecError("must be a built-in spec name or a path", file=label, line=line,
                        path="extends")
    try:
        parent_path = _resolve(parent_ref, path.parent)
    except SpecError as error:
        _, line = locations.find(("extends",))
        raise SpecError(error.detail, file=label, line=line, path="extends") from None
    if parent_path.resolve() in chain:
        _, line = locations.find(("extends",))
        raise SpecError(f"`extends` loops back to {parent_path}", file=label, line=line,
                        path="extends")
    parent, parent_locations = _read(parent_path, chain + (parent_path.resolve(),))
    merged = _merge(parent, data)
    merged_locations = Locations(dict(parent_locations.lines))
    for key, where in locations.lines.items():
        merged_locations.lines[key] = where
    # A list replaced by the child must not keep the parent's per-item lines.
    for key, value in data.items():
        if isinstance(value, list):
            for k in list(merged_locations.lines):
                if k[:1] == (key,) and len(k) > 1 and locations.lines.get(k) is None:
                    del merged_locations.lines[k]
    return merged, merged_locations


def _pydantic_message(error: dict[str, Any], model_fields: dict[KeyPath, list[str]]) -> str:
    kind = error.get("type", "")
    loc = tuple(error.get("loc", ()))
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        known = model_fields.get(loc[:-1], [])
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}" + (f"; expected one of: {', '.join(known)}"
                                                if known and not close else "")
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags', '')}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{error.get('input')!r} is not one of {expected}"
    if kind == "missing":
        return "missing required key"
    message = error.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    given = error.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message} (got {given!r})"
    return message


def _clean_loc(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Drop pydantic's union-branch labels (``str``, ``list[int]``, tags) from a location."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        following = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(node, dict) and part not in node and following in node:
            continue        # a tagged union's tag (``int4`` of ``weights.int4.granularity``)
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part not in node and isinstance(part, str) and \
                not any(c in part for c in "[]()|,"):
            out.append(part)
            node = None
        elif node is None and isinstance(part, (str, int)):
            out.append(part)
    return tuple(out)


def _fields_index(model: type[BaseModel], prefix: KeyPath = ()) -> dict[KeyPath, list[str]]:
    index: dict[KeyPath, list[str]] = {prefix: [n for n, f in model.model_fields.items()
                                                if not f.exclude]}
    return index


def validation_error_to_spec_error(error: ValidationError, data: Any, locations: Locations,
                                   fallback_file: str | None, prefix: KeyPath = (),
                                   known: dict[KeyPath, list[str]] | None = None) -> SpecError:
    errors = error.errors()
    first = errors[0]
    loc = _clean_loc(tuple(first.get("loc", ())), data)
    if first.get("type") == "union_tag_invalid":
        # a tagged union's tag is wrong (weights.dtype: int5): point at the tag's own key
        key = str(first.get("ctx", {}).get("discriminator", "")).strip("'")
        if key and isinstance(first.get("input"), dict) and key in first["input"]:
            loc = loc + (key,)
    path = prefix + loc
    known = known or {}
    message = _pydantic_message({**first, "loc": loc}, known)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    file, line = locations.find(path)
    return SpecError(message, file=file or fallback_file, line=line, path=format_path(path))


def _known_keys(data: Any) -> dict[KeyPath, list[str]]:
    """Known keys at each level of the spec (for 'did you mean' hints)."""
    known: dict[KeyPath, list[str]] = {(): list(Spec.model_fields)}
    known[()].remove("source")
    simple: dict[str, type[BaseModel]] = {"calibration": Calibration, "verify": Verify,
                                          "tune": Tune, "output": Output}
    for key, model in simple.items():
        known[(key,)] = list(model.model_fields)
    known[("verify", "budget")] = list(Budget.model_fields)
    if isinstance(data, dict) and isinstance(data.get("passes"), list):
        for i in range(len(data["passes"])):
            known[("passes", i, "select")] = list(Selector.model_fields)
            known[("passes", i, "select", "exclude")] = list(SelectorBase.model_fields)
            known[("passes", i, "select", "param")] = list(ParamCondition.model_fields)
            known[("passes", i, "budget")] = list(Budget.model_fields)
    return known


def _locate_pass_keys(data: dict[str, Any], locations: Locations) -> None:
    """Validation paths say passes[i].select; YAML has passes[i].<name>.select."""
    passes = data.get("passes")
    for i, item in enumerate(passes if isinstance(passes, list) else []):
        if isinstance(item, dict) and len(item) == 1:
            (name,) = item
            locations.copy_under(("passes", i, name), ("passes", i))


def _pass_fields(data: Any, locations: Locations, file: str | None) -> list[dict[str, Any]]:
    """Every pass item as PassEntry fields (options raw); a malformed item is a SpecError."""
    passes = data.get("passes") if isinstance(data, dict) else None
    fields = []
    for i, item in enumerate(passes if isinstance(passes, list) else []):
        try:
            fields.append(pass_item_fields(item, i))
        except ValueError as error:
            where, line = locations.find(("passes", i))
            raise SpecError(str(error), file=where or file, line=line,
                            path=format_path(("passes", i))) from None
    return fields


def _typed_options(entry: PassEntry, raw: dict[str, Any], config_for: ConfigLookup,
                   locations: Locations, file: str | None) -> PassConfig:
    """The pass's config object from its raw options; errors point into the YAML."""
    i = entry.index
    try:
        config_class = config_for(entry.name)
    except KilnError as error:
        where, line = locations.find(("passes", i))
        raise SpecError(str(error), file=where or file, line=line,
                        path=format_path(("passes", i))) from None
    try:
        return config_class.model_validate(raw)
    except ValidationError as error:
        # Options sit under the pass name in YAML: passes[i].<name>.<option>.
        located = validation_error_to_spec_error(
            error, raw, locations, file, prefix=("passes", i, entry.name),
            known={(): list(config_class.model_fields)})
        raise SpecError(f"pass {entry.name!r}: {located.detail}", file=located.file,
                        line=located.line, path=located.path) from None


def spec_from_data(data: Any, *, config_for: ConfigLookup, file: str | None = None,
                   locations: Locations | None = None) -> Spec:
    """Validate a parsed document: the sections first (in document order), then each pass's
    options with its config class."""
    locations = locations or Locations()
    if isinstance(data, dict):
        _check_version(data, locations, file)
        _locate_pass_keys(data, locations)
    fields = _pass_fields(data, locations, file)
    raw_options = [f.pop("options") for f in fields]
    document = {**data, "passes": fields, "source": file} if isinstance(data, dict) and \
        "passes" in data and isinstance(data["passes"], list) else \
        ({**data, "source": file} if isinstance(data, dict) else data)
    try:
        spec = Spec.model_validate(document)
    except ValidationError as error:
        shaped = document if isinstance(document, dict) else data
        raise validation_error_to_spec_error(error, shaped, locations, file,
                                             known=_known_keys(data)) from None
    entries = [entry.model_copy(update={"options": _typed_options(
        entry, raw, config_for, locations, file)}) for entry, raw in zip(spec.passes,
                                                                          raw_options)]
    spec = attach_locations(spec.model_copy(update={"passes": entries}), locations)
    problem = sample_memory_problem(spec)
    if problem is not None:
        raise spec.error(*problem)
    return spec


def load_spec(ref: str | Path, *, config_for: ConfigLookup) -> Spec:
    """Load a spec by built-in name (``int8``) or path, resolving ``extends``."""
    if not str(ref).strip():
        raise SpecError("empty spec name: give a spec file or a built-in spec name "
                        f"({', '.join(sorted(builtin_specs()))})")
    if isinstance(ref, Path) or str(ref).endswith((".yaml", ".yml")) or Path(str(ref)).exists():
        path = Path(ref)
        if not path.exists():
            raise SpecError("no such spec file", file=str(path))
    else:
        path = _resolve(str(ref), None)
    data, locations = _read(path, (path.resolve(),))
    return spec_from_data(data, config_for=config_for, file=str(path), locations=locations)


def spec_from_text(text: str, *, config_for: ConfigLookup, file: str = "<spec>") -> Spec:
    """Load a spec from a YAML string (``extends`` resolves built-in names and absolute paths)."""
    data, locations = compose(text, file)
    if not isinstance(data, dict):
        raise SpecError("a spec must be a mapping of keys (kiln:, passes:, ...)", file=file, line=1)
    _check_version(data, locations, file)
    if "extends" in data:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spec.yaml"
            path.write_text(text, encoding="utf-8")
            data, locations = _read(path, (path.resolve(),))
            # Keep the caller's label in messages.
            for key, (f, line) in list(locations.lines.items()):
                if f == str(path):
                    locations.lines[key] = (file, line)
    return spec_from_data(data, config_for=config_for, file=file, locations=locations)


def _no_passes(name: str) -> type[PassConfig]:
    raise KilnError(f"unknown pass {name!r}")


def default_spec() -> Spec:
    """A spec with no passes (load, verify, lower)."""
    return spec_from_data({"kiln": SPEC_VERSION}, config_for=_no_passes, file="<default>")
