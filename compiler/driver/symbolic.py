"""Symbolic input dimensions: one build that serves every size in a range.

A dimension of ``--input`` (or of ``input_shapes``) is an integer, a symbol name
(``W``), a range (``16..1024``: a symbol named ``<input>_<axis>``) or a named range
(``W=16..1024``); ``--dim W=16..1024`` gives a named symbol its range. A symbol
with no range gets :data:`DEFAULT_RANGE`. The model's own dynamic dims (ONNX
``dim_param``) become symbols when a range names them. Symbol names are letters,
digits and ``_`` without ``x``/``X`` (the dims separator), starting with an uppercase
letter (``W``, ``T``, ``Seq``), so a typo such as ``1xthreex32`` stays an error.

The ranges travel with the model in its metadata (:data:`DIMS_KEY`, JSON
``{"W": [16, 1024]}``) through the passes to the TVM build, which writes them into
the manifest; verification during the passes runs at each symbol's lower bound, and
the compiled module is checked against ONNX Runtime at the lower bound, the middle
and the upper bound (:func:`check_sizes`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from kiln.compiler.core.errors import FrontendError
from kiln.compiler.core.frontend import load_model

DIMS_KEY = "kiln.dims"
DEFAULT_RANGE = (1, 1024)
_NAME = re.compile(r"^[A-WYZ][A-Za-wyzA-WYZ0-9_]*$")
#: a ``--dim`` name may also be a model's own dim_param (``batch``, ``seq_len``)
_DIM_PARAM = re.compile(r"^[A-Za-z_][\w.\-]*$")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")

Dim = int | str
Ranges = dict[str, tuple[int, int]]


def _range(text: str, where: str) -> tuple[int, int]:
    match = _RANGE.match(text)
    if not match:
        raise FrontendError(f"{where}: range {text!r} must be LO..HI (e.g. 16..1024)")
    lo, hi = int(match.group(1)), int(match.group(2))
    if lo <= 0 or hi < lo:
        raise FrontendError(f"{where}: range {text!r} needs 1 <= LO <= HI")
    return lo, hi


def parse_dim(token: str | int, where: str, default_name: str) -> tuple[Dim, tuple[int, int] | None]:
    """One dimension: int, NAME, LO..HI or NAME=LO..HI -> (int or symbol name, range)."""
    if isinstance(token, int):
        if token <= 0:
            raise FrontendError(f"{where}: dims must be positive")
        return token, None
    token = token.strip()
    if token.isdigit():
        return parse_dim(int(token), where, default_name)
    name, sep, rest = token.partition("=")
    if not sep and _RANGE.match(token):
        return default_name, _range(token, where)
    if not _NAME.match(name):
        raise FrontendError(f"{where}: dims must be integers, symbols (an uppercase letter "
                            f"first, no 'x': W, Seq) or ranges (16..1024, W=16..1024), not "
                            f"{token!r}")
    return name, _range(rest, where) if sep else None


def parse_binding(text: str) -> tuple[str, list[str]]:
    """``x=1x3x48xW=16..1024`` -> ('x', ['1', '3', '48', 'W=16..1024']) (checked)."""
    name, sep, dims = text.partition("=")
    if not sep or not name or not dims:
        raise FrontendError(f"--input {text!r}: expected NAME=DIMxDIMx... (e.g. x=1x3x224x224 "
                            "or x=1x3x48xW)")
    tokens = re.split(r"[xX]", dims)
    for axis, token in enumerate(tokens):
        parse_dim(token, f"--input {text!r}", f"{name}_{axis}")
    return name, tokens


def parse_dim_option(text: str) -> tuple[str, tuple[int, int]]:
    """``--dim W=16..1024`` -> ('W', (16, 1024))."""
    name, sep, rest = text.partition("=")
    if not sep or not _DIM_PARAM.match(name):
        raise FrontendError(f"--dim {text!r}: expected NAME=LO..HI (e.g. W=16..1024)")
    return name, _range(rest, f"--dim {text!r}")


def split_shapes(shapes: Mapping[str | int, Sequence[Dim]]
                 ) -> tuple[dict[str | int, list[Dim]], Ranges]:
    """Input shapes with symbol names (no ranges) and every range given. A key ``*NAME``
    (``--dim`` for a model's own dim_param) carries the range ``[NAME=LO..HI]`` alone."""
    bound: dict[str | int, list[Dim]] = {}
    ranges: Ranges = {}
    for key, dims in shapes.items():
        where = f"input {key!r}"
        if isinstance(key, str) and key.startswith("*"):  # "*W": [W=LO..HI], a range alone
            ranges[key[1:]] = _range(str(dims[0]).partition("=")[2], f"--dim {key[1:]}")
            continue
        out: list[Dim] = []
        for axis, token in enumerate(dims):
            try:
                dim, span = parse_dim(token if isinstance(token, int | str) else int(token),
                                      where, f"{key}_{axis}")
            except FrontendError as error:  # input_key: the driver names the spec's line
                raise FrontendError(str(error), input_key=key) from None
            if span is not None:
                if dim in ranges and ranges[str(dim)] != span:
                    raise FrontendError(f"{where}: symbol {dim!r} is given two ranges "
                                        f"({ranges[str(dim)]} and {span})")
                ranges[str(dim)] = span
            out.append(dim)
        bound[key] = out
    return bound, ranges


def attach(model: ir.Model, ranges: Ranges, named: set[str]) -> Ranges:
    """Record the symbols of the model's inputs (those named by the user get their range or
    :data:`DEFAULT_RANGE`; a dim_param counts only when a range names it) in its metadata."""
    used: Ranges = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.shape is None:
            continue
        for dim in value.shape.dims:
            if isinstance(dim, int):
                continue
            name = getattr(dim, "value", None)
            if isinstance(name, str) and (name in ranges or name in named):
                used[name] = ranges.get(name, DEFAULT_RANGE)
    unused = sorted(set(ranges) - set(used))
    if unused:
        raise FrontendError(f"--dim {unused[0]}: no input of the model has a dim named "
                            f"{unused[0]!r}")
    if used:
        model.metadata_props[DIMS_KEY] = json.dumps(used, sort_keys=True)
    return used


def model_ranges(model: ir.Model) -> Ranges:
    """The symbols and ranges the model carries (empty for a static model)."""
    text = model.metadata_props.get(DIMS_KEY)
    if not text:
        return {}
    return {k: (int(v[0]), int(v[1])) for k, v in json.loads(text).items()}


def check_sizes_values(ranges: Ranges) -> list[dict[str, int]]:
    """The sizes a symbolic build is checked at: every symbol at its low end, middle, high end."""
    picks = []
    for which in (0, 1, 2):
        picks.append({name: (lo, (lo + hi) // 2, hi)[which] for name, (lo, hi) in ranges.items()})
    unique = []
    for pick in picks:
        if pick not in unique:
            unique.append(pick)
    return unique


def concrete_shape(dims: Sequence, sizes: Mapping[str, int]) -> list[int]:
    """``dims`` with each symbol replaced by its size (dims are ints or symbol names)."""
    out = []
    for dim in dims:
        name = getattr(dim, "value", dim)
        out.append(int(sizes[name]) if isinstance(name, str) else int(name))
    return out


def load_with_symbols(source, shapes: Mapping[str | int, Sequence[Dim]] | None, *,
                      loader=load_model) -> ir.Model:
    """:func:`kiln.compiler.core.frontend.load_model` (or ``loader``) with symbolic dims:
    symbols bound by name and their ranges recorded (:func:`attach`); a static binding
    loads as before."""
    bound, ranges = split_shapes(shapes or {})
    named = {d for dims in bound.values() for d in dims if isinstance(d, str)}
    model = loader(source, input_shapes=bound)
    attach(model, ranges, named)
    return model
