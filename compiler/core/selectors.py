"""Selectors: which nodes of a model a pass may touch.

``op`` matches op types; ``name`` and ``module`` are globs over the node name and
the PyTorch module path (a ``re:`` prefix makes a pattern a full-match regex);
``param`` puts conditions on the node's weight; ``exclude`` subtracts nodes
matching the same keys. Within one key any item may match; all given keys must.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.spec import ParamCondition, Selector, SelectorBase


def _pattern_matches(pattern: str, text: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], text) is not None
    return fnmatch.fnmatchcase(text, pattern)


def _any(patterns: Iterable[str], text: str) -> bool:
    return any(_pattern_matches(p, text) for p in patterns)


def _param_ok(condition: ParamCondition, node: ir.Node) -> bool:
    weight = kir.weight_value(node)
    tensor = kir.constant_tensor(weight)
    if tensor is None:
        return False
    size = kir.tensor_size(tensor)
    if condition.min_elements is not None and size < condition.min_elements:
        return False
    if condition.max_elements is not None and size > condition.max_elements:
        return False
    if condition.ndim is not None and len(tensor.shape) != condition.ndim:
        return False
    return True


def _matches(selector: SelectorBase, node: ir.Node) -> bool:
    if selector.op is not None and node.op_type not in selector.op:
        return False
    if selector.name is not None and not _any(selector.name, node.name or ""):
        return False
    if selector.module is not None and not _any(selector.module, kir.module_path(node)):
        return False
    if selector.param is not None and not _param_ok(selector.param, node):
        return False
    return True


def _is_empty(selector: SelectorBase) -> bool:
    return all(getattr(selector, key) is None for key in ("op", "name", "module", "param"))


def node_selected(selector: Selector | None, node: ir.Node) -> bool:
    """True when the node passes the selector (no selector selects everything)."""
    if selector is None:
        return True
    if not _matches(selector, node):
        return False
    if selector.exclude is not None and not _is_empty(selector.exclude) \
            and _matches(selector.exclude, node):
        return False
    return True


def select_nodes(model: ir.Model, selector: Selector | None) -> list[ir.Node]:
    """The nodes of the main graph the selector keeps, in graph order."""
    return [node for node in kir.nodes(model) if node_selected(selector, node)]


def describe(selector: Selector | None) -> str:
    """A short readable form for messages: ``op=[Conv] name=['*head*'] exclude(...)``."""
    if selector is None:
        return "all nodes"
    data = selector.model_dump(exclude_none=True)
    return " ".join(f"{k}={v}" for k, v in data.items()) or "all nodes"
