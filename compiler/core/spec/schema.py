"""The spec language's schema: a strict, typed, frozen model per section (docs/spec.md).

What a YAML document becomes once loaded (``load``): unknown keys are errors,
every value is validated on construction, and each pass's options are its own
typed config object (``PassEntry.options``).
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from kiln.compiler.core.errors import SpecError
from kiln.compiler.core.pass_api import PassConfig
from kiln.compiler.core.spec.located_yaml import KeyPath, Locations, format_path

SPEC_VERSION = 1


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


class RandomSource(_Strict):
    """Seeded normal inputs (``random``)."""

    def yaml_form(self) -> str:
        return "random"


class NpzSource(_Strict):
    """One array per input name, samples along the first axis (``npz:PATH``)."""

    path: str

    def yaml_form(self) -> str:
        return f"npz:{self.path}"


class FolderSource(_Strict):
    """Images in a folder, made into inputs by ``preprocess`` (``folder:PATH``)."""

    path: str

    def yaml_form(self) -> str:
        return f"folder:{self.path}"


class CallableSource(_Strict):
    """A Python callable yielding input dicts (``module:function`` or ``file.py:function``;
    a relative file is found next to the spec): :mod:`kiln.compiler.driver.samples`."""

    module: str
    function: str

    def yaml_form(self) -> str:
        return f"{self.module}:{self.function}"


_CALLABLE = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_]*)$")


def _source_from_yaml(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value == "random":
        return RandomSource()
    for prefix, kind in (("npz:", NpzSource), ("folder:", FolderSource)):
        if value.startswith(prefix) and value[len(prefix):]:
            return kind(path=value[len(prefix):])
    match = _CALLABLE.match(value)
    if match and not value.startswith(("npz:", "folder:")):
        return CallableSource(module=match["module"], function=match["function"])
    raise ValueError(f"{value!r} is not one of random, npz:PATH, folder:PATH, "
                     "module:function, file.py:function")


#: Where calibration samples come from, typed at load; written back as its YAML string.
CalibrationSource = Annotated[
    RandomSource | NpzSource | FolderSource | CallableSource,
    BeforeValidator(_source_from_yaml, json_schema_input_type=str),
    PlainSerializer(lambda source: source.yaml_form(), return_type=str),
]


class Calibration(_Strict):
    """Data for passes that need activations; the same samples feed verification.

    ``source`` is ``random`` (seeded normal inputs), ``npz:PATH`` (one array per
    input name, samples along the first axis) or ``folder:PATH`` (images, with
    ``preprocess``), loaded as :class:`RandomSource` / :class:`NpzSource` /
    :class:`FolderSource`."""

    source: CalibrationSource = Field(default=RandomSource(),
                                      json_schema_extra={"default": "random"})
    samples: int = Field(default=8, ge=1, le=100000)
    seed: int = 0
    preprocess: Preprocess | None = None

    @model_validator(mode="after")
    def _folder_needs_preprocess(self) -> Calibration:
        if isinstance(self.source, FolderSource) and self.preprocess is None:
            raise ValueError("a folder: source needs `preprocess:` (at least size: [H, W])")
        return self


def _npz_from_yaml(value: Any) -> Any:
    if isinstance(value, str):
        if not value.startswith("npz:") or not value[4:]:
            raise ValueError(f"{value!r} is not npz:PATH")
        return NpzSource(path=value[4:])
    return value


#: Verification inputs the user gives (``npz:PATH``: one array per input name).
VerifyInputs = Annotated[NpzSource, BeforeValidator(_npz_from_yaml, json_schema_input_type=str),
                         PlainSerializer(lambda source: source.yaml_form(), return_type=str)]


class Verify(_Strict):
    """Per-pass and end-to-end numerical checks with ONNX Runtime (on ``inputs`` when
    given, else on the calibration source's samples or seeded random inputs)."""

    enabled: bool = True
    samples: int = Field(default=2, ge=1, le=1000)
    seed: int = 0
    budget: Budget | None = None
    # fallback: keep the most sensitive layers in float until the budget holds
    on_budget_exceeded: Literal["fail", "skip_pass", "fallback"] = "fail"
    inputs: VerifyInputs | None = None
    # Exact passes must match to float32 tolerance: |a-b| <= atol + rtol * max|ref|.
    rtol: float = Field(default=1e-4, gt=0)
    atol: float = Field(default=1e-5, ge=0)


class Tune(_Strict):
    """MetaSchedule tuning budget; records go to a persistent per-target database
    (``db``, default under the user's cache folder) reused by every later compile."""

    trials: int = Field(default=0, ge=0)
    db: str | None = None


class Output(_Strict):
    """What a compile writes; ``keep_symbols`` keeps the symbol table of a cross-compiled
    library (stripped by default: an arm64 model.so is about a third smaller without it)."""

    onnx: bool = True
    tvm: bool = True
    report: list[Literal["json", "html"]] = ["json"]
    keep_symbols: bool = False
    #: ``kiln compile --measure [RUNS]``: after a host build, time it against the
    #: uncompressed model and ONNX Runtime (``RUNS`` calls each; 0: off) into report.json
    measure: int = Field(default=0, ge=0, le=10000)


class PassEntry(_Strict):
    """One item of ``passes:``: the pass's name, the keys every pass takes (``select``,
    ``optional``, ``budget``) and its own options, typed by the pass's config class when
    the spec is loaded (``load.spec_from_data``)."""

    name: str
    select: Selector | None = None
    optional: bool = False
    budget: Budget | None = None
    options: SerializeAsAny[PassConfig] = PassConfig()
    index: int = 0


#: The keys of a pass item that are not the pass's own options.
COMMON_PASS_KEYS = ("select", "optional", "budget")


def _machine_memory() -> int:
    """Bytes of physical memory (a generous 1 TiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _bytes_text(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _largest(dim: int | str) -> int:
    """A dim's largest size: a symbolic dim (``W``, ``W=16..1024``, ``16..1024``; see
    kiln.compiler.driver.symbolic) counts as its range's upper end, else as 1."""
    if isinstance(dim, int):
        return dim
    tail = str(dim).rpartition("..")[2]
    return int(tail) if ".." in str(dim) and tail.isdigit() else 1


def check_input_size(dims: list[int | str]) -> list[int | str]:
    """Refuse input dims whose float32 tensor the machine could not hold (verification and
    calibration make such tensors): ``[1099511627776, 3, 16, 16]`` is 3 PiB. A ValueError
    says by how much; the spec loader and ``--input`` name the file, key and input."""
    elements = math.prod(_largest(d) for d in dims)
    memory = _machine_memory()
    if elements * 4 > memory:
        shape = "x".join(str(d) for d in dims)
        raise ValueError(f"shape {shape} is {elements:.3g} values ({_bytes_text(elements * 4)} "
                         f"as float32), more than this machine's memory "
                         f"({_bytes_text(memory)})")
    return dims


def sample_memory_problem(spec: Spec) -> tuple[KeyPath, str] | None:
    """A ``samples`` count whose inputs (float32, all of ``inputs:`` per sample) could not
    be held in memory at once: (the key, why), else None. Verification and calibration
    each keep their samples in memory."""
    if not spec.inputs:
        return None
    per_sample = 4 * sum(math.prod(_largest(d) for d in dims) for dims in spec.inputs.values())
    memory = _machine_memory()
    counts = [(("calibration", "samples"), spec.calibration.samples)]
    if spec.verify.enabled:
        counts.append((("verify", "samples"), spec.verify.samples))
    for path, count in counts:
        if count * per_sample > memory:
            return path, (f"{count} samples of the inputs ({_bytes_text(per_sample)} each) "
                          f"need {_bytes_text(count * per_sample)}, more than this machine's "
                          f"memory ({_bytes_text(memory)})")
    return None


#: One input's dims in ``inputs:``: positive, and small enough to be held in memory; a
#: string is a symbolic dim (``W``, ``W=16..1024``), checked when the model is loaded.
InputDims = Annotated[list[Annotated[int, Field(gt=0)] | str], AfterValidator(check_input_size)]


class Rule(_Strict):
    """One item of ``rules:``: a pattern and its replacement as ONNX graphs in textual
    syntax, with conditions on the pattern's inputs (docs/spec.md, "Rewrite rules"). The
    driver runs each as a ``rewrite_rule`` step named ``rule:NAME`` before ``passes:``."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    pattern: str
    replacement: str
    where: dict[str, dict[str, Any]] = {}
    exact: bool = True
    select: Selector | None = None
    optional: bool = False
    budget: Budget | None = None


class Spec(_Strict):
    """A loaded spec: every section typed, each pass's options its config object."""

    kiln: Literal[1]
    name: str | None = None
    extends: str | None = None
    description: str | None = None
    inputs: dict[str, InputDims] | None = None
    calibration: Calibration = Calibration()
    rules: list[Rule] = []
    passes: list[PassEntry] = []
    verify: Verify = Verify()
    target: str | dict[str, Any] | None = None
    tune: Tune = Tune()
    output: Output = Output()
    # A lossy pass that changes nothing is an error, not a warning (CLI: --strict).
    strict: bool = False

    # Where the spec was read from: not part of the schema.
    source: Annotated[str | None, Field(exclude=True)] = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _input_keys(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        return value

    def locate(self, path: KeyPath) -> tuple[str | None, int | None]:
        """The file and line of a key path (``("passes", 1, "select")``), if it was read."""
        return _LOCATIONS.get(id(self), Locations()).find(path)

    def error(self, path: KeyPath, message: str) -> SpecError:
        """A SpecError naming the file, the line and the key path."""
        file, line = self.locate(path)
        return SpecError(message, file=file or self.source, line=line, path=format_path(path))


# Spec id -> where its keys were read (a pydantic private attribute would enter ``==``).
_LOCATIONS: dict[int, Locations] = {}


def attach_locations(spec: Spec, locations: Locations) -> Spec:
    """Remember where ``spec``'s keys were read, for ``Spec.locate`` (until it is freed)."""
    key = id(spec)
    _LOCATIONS[key] = locations
    weakref.finalize(spec, _LOCATIONS.pop, key, None)
    return spec


def with_sections(spec: Spec, **sections: Any) -> Spec:
    """``spec`` with some sections replaced (``output=...``), still locating its keys (a
    command-line flag that overrides a spec key, e.g. ``--keep-symbols``)."""
    updated = spec.model_copy(update=sections)
    return attach_locations(updated, _LOCATIONS.get(id(spec), Locations()))


def pass_item_fields(item: Any, index: int) -> dict[str, Any]:
    """A YAML pass item (``- name: {options}`` or ``- name``) as PassEntry fields, the pass's
    own options still raw under ``options``; a ValueError says why an item is malformed."""
    if isinstance(item, str):
        return {"name": item, "index": index, "options": {}}
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
