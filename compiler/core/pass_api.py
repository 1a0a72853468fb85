"""The contract every kiln pass fulfils (built-in or plugin).

A pass is an ``onnx_ir.passes.InPlacePass`` with a frozen pydantic config. It
works in two steps so that ``kiln plan`` can show what a pass would do without
doing it:

- ``candidates(model)`` finds every place the pass could apply among the
  selected nodes and returns a ``Candidate`` per place, with ``reason`` set
  when the place is refused (a shared weight, a non-constant input...);
- ``rewrite(model, accepted)`` changes the model for the accepted candidates
  and returns how many it rewrote.

``call`` runs ``prepare`` (an exact clean-up a pass needs before matching, e.g.
folding computed weights; default: nothing), then both. Passes never mutate a matched
weight in place: they make a new initializer and redirect its users.

``refusal_summary`` counts the refused candidates by reason ("54 nodes: weight is
not a constant"): the driver warns with it when a lossy pass changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from kiln.compiler.core import graph as kir


class PassConfig(BaseModel):
    """Base of pass configs: frozen, keyword-only, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Candidate:
    """One place a pass could rewrite; ``reason`` is why it was refused (None: accepted)."""

    anchor: ir.Node | None
    label: str
    reason: str | None = None
    nodes: tuple[ir.Node, ...] = ()
    data: Any = field(default=None, compare=False, repr=False)

    @property
    def accepted(self) -> bool:
        return self.reason is None


NodeFilter = Callable[[ir.Node], bool]


class CalibrationContext:
    """What a pass that needs activations gets from the driver (passes cannot run models).

    ``samples`` are the spec's calibration inputs (name -> array);
    ``activations(model, names)`` runs the model on them and returns, for each
    requested value name, one array per sample. ``source`` names where the samples
    came from (``random``, ``npz:PATH``, ...); ``used`` turns True once a pass reads
    them, so the driver can say which passes were calibrated from what.
    """

    def __init__(self, samples: list[dict[str, Any]],
                 collect: Callable[[ir.Model, list[str]], dict[str, list[Any]]], *,
                 source: str = "random") -> None:
        self._samples = samples
        self._collect = collect
        self.source = source
        self.used = False

    @property
    def samples(self) -> list[dict[str, Any]]:
        self.used = True
        return self._samples

    def activations(self, model: ir.Model, names: Sequence[str]) -> dict[str, list[Any]]:
        self.used = True
        return self._collect(model, list(names))


class KilnPass(ir.passes.InPlacePass):
    """Base class of kiln passes.

    Subclasses set ``name`` (the spec name), ``config_class`` and ``exact``
    (True when the rewrite must keep outputs equal to float32 tolerance), and
    implement ``candidates`` and ``rewrite``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    exact: ClassVar[bool] = True
    # Set by passes whose selection is about weights rather than nodes (dedupe).
    summary: ClassVar[str] = ""

    # True for passes that call ``self.calibration.activations`` (the driver then
    # provides a CalibrationContext).
    needs_calibration: ClassVar[bool] = False

    # True when a candidate's ``data`` holds no node or value of the model it was found in
    # (only arrays and numbers), so it can be rewritten on a copy of that model (the
    # per-layer sensitivity analysis does; otherwise it finds the candidates again per copy).
    portable_candidates: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None, *,
                 selected: NodeFilter | None = None,
                 calibration: CalibrationContext | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_class()
        self._selected = selected
        self.calibration = calibration
        self.last_candidates: list[Candidate] = []
        # One line for the report (e.g. "4.25 bits/weight over 12 weights").
        self.note = ""

    def selected(self, node: ir.Node) -> bool:
        return self._selected is None or self._selected(node)

    def selected_nodes(self, model: ir.Model) -> list[ir.Node]:
        return [node for node in kir.nodes(model) if self.selected(node)]

    # -- to implement -------------------------------------------------------------------
    def prepare(self, model: ir.Model) -> int:
        """An exact clean-up before matching (e.g. fold computed weights); returns how many
        places it changed. ``call`` runs it first; tools that call ``candidates`` on their
        own (the sensitivity analysis) run it too."""
        return 0

    def candidates(self, model: ir.Model) -> list[Candidate]:
        raise NotImplementedError

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        raise NotImplementedError

    # -- onnx_ir pass protocol ------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        prepared = self.prepare(model)
        found = self.candidates(model)
        self.last_candidates = found
        accepted = [c for c in found if c.accepted]
        changed = self.rewrite(model, accepted) if accepted else 0
        return ir.passes.PassResult(model, modified=changed > 0 or prepared > 0)


def refusal_summary(candidates: Sequence[Candidate], *, top: int = 3) -> str:
    """The most common refusal reasons with their counts, most common first:
    ``"54 nodes: weight is not a constant; 2 nodes: ..."`` ("" when nothing was refused)."""
    counts = Counter(c.reason for c in candidates if c.reason is not None)
    if not counts:
        return ""
    parts = [f"{n} node{'s' if n != 1 else ''}: {reason}" for reason, n in counts.most_common(top)]
    rest = sum(counts.values()) - sum(n for _, n in counts.most_common(top))
    if rest:
        parts.append(f"{rest} more with {len(counts) - top} other reason(s)")
    return "; ".join(parts)


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not yet used in the graph (deterministic: base, base_1, ...)."""
    taken = set(graph.initializers)
    for node in graph:
        for value in node.outputs:
            if value.name:
                taken.add(value.name)
    for value in graph.inputs:
        if value.name:
            taken.add(value.name)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def add_initializer(graph: ir.Graph, base_name: str, array) -> ir.Value:
    """A new initializer holding ``array`` (numpy), registered under a unique name."""
    name = unique_name(graph, base_name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(
        ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def remove_unused_initializers(graph: ir.Graph, names: Sequence[str]) -> None:
    for name in names:
        value = graph.initializers.get(name)
        if value is not None and not value.uses() and not value.is_graph_output() \
                and not value.is_graph_input():
            del graph.initializers[name]


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value, *,
                  take_name: bool = True) -> None:
    """Point every use of ``old`` at ``new``; ``new`` takes ``old``'s name (a graph output
    always keeps its name), so rewritten graphs keep readable, stable value names."""
    was_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output or take_name:
        old.name = None
        new.name = name


def copy_metadata(source: ir.Node, target: ir.Node) -> None:
    """Keep the module path and other metadata of the node a rewrite replaces."""
    for key, value in source.metadata_props.items():
        target.metadata_props[key] = value
