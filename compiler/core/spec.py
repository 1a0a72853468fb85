"""The spec language: a strict, typed YAML document (SPEC.md).

``load_spec(name_or_path)`` reads YAML keeping every key's line, resolves
``extends:`` (maps merged, lists replaced), validates with pydantic and turns
any problem into a ``SpecError`` naming the file, the line and the key path.
Pass-specific options are kept raw here (this module knows no pass); the
pipeline validates them against each pass's config with ``Spec.locate``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from kiln.compiler.core.errors import SpecError

SPEC_VERSION = 1
KeyPath = tuple[str | int, ...]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-*/:@+]+\Z")


def format_path(path: KeyPath) -> str:
    """``passes[1].select.op``; a key that is not plain text is quoted: ``inputs['input.1']``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


# One string or a list of them (`op: Conv` or `op: [Conv, Gemm]`), in the schema too.
StrList = Annotated[list[str], BeforeValidator(_as_list,
                                               json_schema_input_type=str | list[str])]


def _check_patterns(patterns: list[str] | None) -> list[str] | None:
    for pattern in patterns or ():
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(f"bad regex {pattern[3:]!r}: {error}") from None
    return patterns


class ParamCondition(_Strict):
    """Conditions on a node's weight (its largest constant input)."""

    min_elements: int | None = Field(default=None, ge=0)
    max_elements: int | None = Field(default=None, ge=0)
    ndim: int | None = Field(default=None, ge=0)


class SelectorBase(_Strict):
    op: StrList | None = None
    name: StrList | None = None
    module: StrList | None = None
    param: ParamCondition | None = None

    @field_validator("name", "module")
    @classmethod
    def _valid_patterns(cls, value: list[str] | None) -> list[str] | None:
        return _check_patterns(value)


class Selector(SelectorBase):
    """Which nodes a pass may touch: `op`, `name`/`module` globs (``re:`` for a regex),
    `param` conditions, minus `exclude`."""

    exclude: SelectorBase | None = None


class Budget(_Strict):
    """The error a lossy step may cost: a floor on SQNR (dB) and/or a cap on max abs error."""

    sqnr_db: float | None = None
    max_abs_err: float | None = Field(default=None, ge=0)


class Preprocess(_Strict):
    """How images from a ``folder:`` calibration source become one model input:
    resize to ``size`` (H, W), convert ``color``, scale pixel values by ``scale``,
    subtract ``mean`` and divide by ``std`` per channel, lay out as ``layout``."""

    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: list[float] = [0.0]
    std: list[Annotated[float, Field(gt=0)]] = [1.0]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input: str | None = None      # the model input fed (default: the first)


class Calibration(_Strict):
    """Data for passes that need activations; the same samples feed verification.

    ``source`` is ``random`` (seeded normal inputs), ``npz:PATH`` (one array per
    input name, samples along the first axis) or ``folder:PATH`` (images, with
    ``preprocess``)."""

    source: str = "random"
    samples: int = Field(default=8, ge=1, le=100000)
    seed: int = 0
    preprocess: Preprocess | None = None

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        if value == "random" or value.startswith(("npz:", "folder:")):
            return value
        raise ValueError(f"{value!r} is not one of random, npz:PATH, folder:PATH")

    @model_validator(mode="after")
    def _folder_needs_preprocess(self) -> "Calibration":
        if self.source.startswith("folder:") and self.preprocess is None:
            raise ValueError("a folder: source needs `preprocess:` (at least size: [H, W])")
        return self


class Verify(_Strict):
    """Per-pass and end-to-end numerical checks with ONNX Runtime."""

    enabled: bool = True
    samples: int = Field(default=2, ge=1, le=1000)
    seed: int = 0
    budget: Budget | None = None
    on_budget_exceeded: Literal["fail", "skip_pass"] = "fail"
    # Exact passes must match to float32 tolerance: |a-b| <= atol + rtol * max|ref|.
    rtol: float = Field(default=1e-4, gt=0)
    atol: float = Field(default=1e-5, ge=0)


class Tune(_Strict):
    """MetaSchedule tuning budget; records go to a persistent per-target database
    (``db``, default under the user's cache folder) reused by every later compile."""

    trials: int = Field(default=0, ge=0)
    db: str | None = None


class Output(_Strict):
    onnx: bool = True
    tvm: bool = True
    report: list[Literal["json", "html"]] = ["json"]


class PassEntry(_Strict):
    """One item of ``passes:``; options other than the common keys belong to the pass."""

    name: str
    select: Selector | None = None
    optional: bool = False
    budget: Budget | None = None
    options: dict[str, Any] = {}
    index: int = 0


COMMON_PASS_KEYS = ("select", "optional", "budget")


class Spec(_Strict):
    kiln: Literal[1]
    name: str | None = None
    extends: str | None = None
    description: str | None = None
    inputs: dict[str, list[Annotated[int, Field(gt=0)]]] | None = None
    calibration: Calibration = Calibration()
    passes: list[PassEntry] = []
    verify: Verify = Verify()
    target: str | dict[str, Any] | None = None
    tune: Tune = Tune()
    output: Output = Output()

    # Where each key came from: not part of the schema.
    source: Annotated[str | None, Field(exclude=True)] = None

    @model_validator(mode="before")
    @classmethod
    def _split_passes(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("passes"), list):
            data = dict(data)
            data["passes"] = [_pass_entry(item, i) for i, item in enumerate(data["passes"])]
        return data

    @field_validator("inputs", mode="before")
    @classmethod
    def _input_keys(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        return value

    def locate(self, path: KeyPath) -> tuple[str | None, int | None]:
        return _LOCATIONS.get(id(self), _Locations()).find(path)

    def error(self, path: KeyPath, message: str) -> SpecError:
        file, line = self.locate(path)
        return SpecError(message, file=file or self.source, line=line, path=format_path(path))


def _pass_entry(item: Any, index: int) -> Any:
    """``- name: {options}`` or ``- name`` -> a PassEntry-shaped dict."""
    if isinstance(item, str):
        return {"name": item, "index": index}
    if isinstance(item, Mapping) and len(item) == 1:
        (name, options), = item.items()
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(f"options of pass {name!r} must be a mapping")
        common = {k: options[k] for k in COMMON_PASS_KEYS if k in options}
        rest = {k: v for k, v in options.items() if k not in COMMON_PASS_KEYS}
        return {"name": str(name), "index": index, "options": rest, **common}
    raise ValueError("each pass must be `- name: {options}` (a mapping with one key)")


# -- YAML with line numbers -------------------------------------------------------------

@dataclass
class _Locations:
    """Key path -> (file, line) for every key of a (possibly merged) spec."""

    lines: dict[KeyPath, tuple[str, int]] = field(default_factory=dict)

    def find(self, path: KeyPath) -> tuple[str | None, int | None]:
        # A pass's config error comes as ("passes", i, "<option>"); options sit under the
        # pass name in YAML, which the loader records at the same path.
        for cut in range(len(path), -1, -1):
            hit = self.lines.get(tuple(path[:cut]))
            if hit:
                return hit
        return None, None


_LOCATIONS: dict[int, _Locations] = {}


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _compose(text: str, file: str) -> tuple[Any, _Locations]:
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"invalid YAML: {problem}", file=file,
                        line=mark.line + 1 if mark else None) from None
    locations = _Locations()
    if node is None:
        return None, locations

    def build(n: yaml.Node, path: KeyPath) -> Any:
        locations.lines.setdefault(path, (file, n.start_mark.line + 1))
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and n.tag not in _PLAIN_TAGS:
            # !!python/..., !!set, !!omap: the spec language has plain maps and lists only.
            raise SpecError(f"invalid YAML: tag {n.tag!r} is not supported", file=file,
                            line=n.start_mark.line + 1, path=format_path(path))
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = build_scalar(key_node)
                if isinstance(key, (list, dict)):
                    raise SpecError("a key must be a scalar", file=file,
                                    line=key_node.start_mark.line + 1, path=format_path(path))
                if key in out:
                    raise SpecError(f"duplicate key {key!r}", file=file,
                                    line=key_node.start_mark.line + 1, path=format_path(path))
                child = path + (key,)
                locations.lines[child] = (file, key_node.start_mark.line + 1)
                out[key] = build(value_node, child)
                # passes[i].<name>.<opt> is validated as passes[i].<opt>: record both.
                if len(path) == 2 and path[0] == "passes" and isinstance(path[1], int):
                    _alias_pass_options(locations, path, key, value_node, file)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        return build_scalar(n)

    def build_scalar(n: yaml.Node) -> Any:
        if isinstance(n, yaml.ScalarNode):
            return _scalar(n, file)
        return [] if isinstance(n, yaml.SequenceNode) else {}

    return build(node, ()), locations


def _scalar(n: yaml.ScalarNode, file: str | None = None) -> Any:
    loader = _UniqueKeyLoader("")
    try:
        return loader.construct_object(n)
    except yaml.YAMLError as error:
        # Tags the safe loader refuses (!!python/..., merge keys `<<`) and bad !!binary etc.
        if n.tag == "tag:yaml.org,2002:merge":
            problem = "merge keys (`<<`) are not supported; use `extends:`"
        else:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            problem = f"invalid YAML: {problem}"
        raise SpecError(problem, file=file, line=n.start_mark.line + 1) from None
    finally:
        loader.dispose()


def _alias_pass_options(locations: _Locations, path: KeyPath, name: Any, value_node: yaml.Node,
                        file: str) -> None:
    if not isinstance(value_node, yaml.MappingNode):
        return

    def walk(n: yaml.Node, sub: KeyPath) -> None:
        # setdefault: a block value starts on the line after its key; the key's line wins.
        locations.lines.setdefault(path + sub, (file, n.start_mark.line + 1))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = _scalar(k) if isinstance(k, yaml.ScalarNode) else None
                locations.lines[path + sub + (key,)] = (file, k.start_mark.line + 1)
                walk_children(v, sub + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, sub + (i,))

    def walk_children(n: yaml.Node, sub: KeyPath) -> None:
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            walk(n, sub)
        else:
            locations.lines.setdefault(path + sub, (file, n.start_mark.line + 1))

    walk(value_node, ())
    # Pass-specific options are validated under "options".
    for key_node, v in value_node.value:
        key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if key not in COMMON_PASS_KEYS:
            locations.lines[path + ("options", key)] = (file, key_node.start_mark.line + 1)
            _copy_sub(locations, path + (key,), path + ("options", key))


def _copy_sub(locations: _Locations, src: KeyPath, dst: KeyPath) -> None:
    for key, where in list(locations.lines.items()):
        if key[:len(src)] == src and len(key) > len(src):
            locations.lines.setdefault(dst + key[len(src):], where)


# -- extends and merging ------------------------------------------------------------------

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


def _check_version(data: dict[Any, Any], locations: _Locations, label: str | None) -> None:
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


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], _Locations]:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"cannot read spec ({error.strerror})", file=label) from None
    except UnicodeDecodeError:
        raise SpecError("not a text file", file=label) from None
    data, locations = _compose(text, label)
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
    merged_locations = _Locations(dict(parent_locations.lines))
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
    """Drop pydantic's union-branch labels (``str``, ``list[int]``...) from a location."""
    out: list[str | int] = []
    node = data
    for part in loc:
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


def validation_error_to_spec_error(error: ValidationError, data: Any, locations: _Locations,
                                   fallback_file: str | None, prefix: KeyPath = (),
                                   known: dict[KeyPath, list[str]] | None = None) -> SpecError:
    errors = error.errors()
    first = errors[0]
    loc = _clean_loc(tuple(first.get("loc", ())), data)
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
    simple = {"calibration": Calibration, "verify": Verify, "tune": Tune, "output": Output}
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


def _locate_pass_keys(data: dict[str, Any], locations: _Locations) -> None:
    """Validation paths say passes[i].select; YAML has passes[i].<name>.select."""
    passes = data.get("passes")
    for i, item in enumerate(passes if isinstance(passes, list) else []):
        if isinstance(item, dict) and len(item) == 1:
            (name,) = item
            _copy_sub(locations, ("passes", i, name), ("passes", i))


def spec_from_data(data: Any, *, file: str | None = None,
                   locations: _Locations | None = None) -> Spec:
    locations = locations or _Locations()
    if isinstance(data, dict):
        _check_version(data, locations, file)
        _locate_pass_keys(data, locations)
        for i, item in enumerate(data.get("passes") or [] if isinstance(data.get("passes"), list)
                                 else []):
            try:
                _pass_entry(item, i)
            except ValueError as error:
                where, line = locations.find(("passes", i))
                raise SpecError(str(error), file=where or file, line=line,
                                path=format_path(("passes", i))) from None
    try:
        spec = Spec.model_validate({**data, "source": file} if isinstance(data, dict) else data)
    except ValidationError as error:
        shaped = dict(data) if isinstance(data, dict) else data
        if isinstance(shaped, dict) and isinstance(shaped.get("passes"), list):
            shaped["passes"] = [_shape_for_loc(p, i) for i, p in enumerate(shaped["passes"])]
        raise validation_error_to_spec_error(error, shaped, locations, file,
                                             known=_known_keys(data)) from None
    _LOCATIONS[id(spec)] = locations
    return spec


def _shape_for_loc(item: Any, index: int) -> Any:
    try:
        return _pass_entry(item, index)
    except ValueError:
        return item


def load_spec(ref: str | Path) -> Spec:
    """Load a spec by built-in name (``int8``) or path, resolving ``extends``."""
    if isinstance(ref, Path) or str(ref).endswith((".yaml", ".yml")) or Path(str(ref)).exists():
        path = Path(ref)
        if not path.exists():
            raise SpecError("no such spec file", file=str(path))
    else:
        path = _resolve(str(ref), None)
    data, locations = _read(path, (path.resolve(),))
    return spec_from_data(data, file=str(path), locations=locations)


def spec_from_text(text: str, *, file: str = "<spec>") -> Spec:
    """Load a spec from a YAML string (``extends`` resolves built-in names and absolute paths)."""
    data, locations = _compose(text, file)
    if not isinstance(data, dict):
        raise SpecError("a spec must be a mapping of keys (kiln:, passes:, ...)", file=file, line=1)
    _check_version(data, locations, file)
    if "extends" in data:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spec.yaml"
            path.write_text(text, encoding="utf-8")
            data, locations = _read(path, (path.resolve(),))
            # Keep the caller's label in messages.
            for key, (f, line) in list(locations.lines.items()):
                if f == str(path):
                    locations.lines[key] = (file, line)
    return spec_from_data(data, file=file, locations=locations)


def default_spec() -> Spec:
    """A spec with no passes (load, verify, lower)."""
    return spec_from_data({"kiln": SPEC_VERSION}, file="<default>")
