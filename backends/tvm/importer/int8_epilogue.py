"""Elementwise tails of integer layers, folded into the kernel's requantizing epilogue.

After a quantized Conv/MatMul, a QDQ graph computes its activation in float before the
next ``QuantizeLinear``: HardSwish written out (``x * Clip(x + 3, 0, 6) / 6``, then a
learnable ``* a + b``), SiLU (``x * Sigmoid(x)``), ``HardSigmoid(x) * x``... This module
finds that tail on the ONNX graph and turns it into a small program that the integer
kernel evaluates per output element, so the layer writes the next layer's uint8 input
directly (no float tensor between the two layers).

The tail (:func:`match_tail`) is the largest set of elementwise nodes, reached from the
layer's output, whose inputs are the layer's output, values of the tail or scalar
constants, and whose values are read only inside the tail except for one, the tail's
result. The program is JSON: ``[[op, operands, params], ...]``; an operand is
``["v", i]`` (value ``i``: 0 the layer's output, ``k`` the k-th step's) or ``["c", f]``;
the last step's value is the result.
"""

from __future__ import annotations

import json

import numpy as np
import onnx

from .packed_weights import attributes

#: Elementwise op -> how many tensor inputs it takes at most (the rest are attributes).
_UNARY = {"Relu", "Sigmoid", "Tanh", "Neg", "HardSigmoid", "HardSwish", "LeakyRelu"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
#: Largest tail followed from one layer.
MAX_TAIL = 16


def _scalar_const(g, name: str) -> float | None:
    value = g.const(name) if name else None
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _step(g, node: onnx.NodeProto, index: dict[str, int]):
    """The program step of ``node`` given the values found so far, or None."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if op in _UNARY:
        if len(node.input) != 1 or node.input[0] not in index:
            return None
        attrs = attributes(node)
        params = {}
        if op == "HardSigmoid":
            params = {"alpha": float(attrs.get("alpha", 0.2)), "beta": float(attrs.get("beta", 0.5))}
        elif op == "LeakyRelu":
            params = {"alpha": float(attrs.get("alpha", 0.01))}
        return [op, [["v", index[node.input[0]]]], params]
    if op in _BINARY:
        if len(node.input) != 2:
            return None
        operands = []
        for name in node.input:
            if name in index:
                operands.append(["v", index[name]])
                continue
            c = _scalar_const(g, name)
            if c is None:
                return None
            operands.append(["c", c])
        if all(kind == "c" for kind, _ in operands):
            return None
        return [op, operands, {}]
    if op == "Clip":
        if not node.input or node.input[0] not in index:
            return None
        bounds = []
        for pos in (1, 2):
            name = node.input[pos] if len(node.input) > pos else ""
            c = _scalar_const(g, name) if name else None
            if name and c is None:
                return None
            bounds.append(c)
        return ["Clip", [["v", index[node.input[0]]]], {"min": bounds[0], "max": bounds[1]}]
    return None


def match_tail(g, start: str) -> tuple[list, list[onnx.NodeProto], str]:
    """(program, nodes, result value) of the elementwise tail after value ``start``
    (an empty program and ``start`` itself when there is none)."""
    index = {start: 0}
    steps: list = []
    nodes: list[onnx.NodeProto] = []
    frontier = [start]
    while frontier and len(nodes) < MAX_TAIL:
        name = frontier.pop(0)
        for reader in g.readers.get(name, []):
            if any(reader is n for n in nodes):
                continue
            step = _step(g, reader, index)
            if step is None:
                continue
            index[reader.output[0]] = len(steps) + 1
            steps.append(step)
            nodes.append(reader)
            frontier.append(reader.output[0])
    values = [start] + [n.output[0] for n in nodes]

    def escapes(value: str, members: set[int]) -> bool:
        return value in g.outputs or any(id(r) not in members for r in g.readers.get(value, []))

    # the result: the latest value whose ancestors form a closed tail
    for last in range(len(values) - 1, 0, -1):
        keep = _ancestors(steps, last)
        members = {id(nodes[k - 1]) for k in keep}
        if all(not escapes(values[k], members) for k in (0, *keep) if k != last):
            order = sorted(keep)
            renumber = {0: 0, **{old: new + 1 for new, old in enumerate(order)}}
            program = [[op, [["v", renumber[i]] if kind == "v" else [kind, i]
                             for kind, i in operands], params]
                       for op, operands, params in (steps[k - 1] for k in order)]
            return program, [nodes[k - 1] for k in order], values[last]
    return [], [], start


def _ancestors(steps: list, last: int) -> set[int]:
    """The steps (1-based) that value ``last`` depends on, itself included."""
    keep, todo = set(), [last]
    while todo:
        k = todo.pop()
        if k == 0 or k in keep:
            continue
        keep.add(k)
        todo += [i for kind, i in steps[k - 1][1] if kind == "v"]
    return keep


def dumps(program: list) -> str:
    return json.dumps(program, separators=(",", ":"))


def evaluate_numpy(program: list, x: np.ndarray) -> np.ndarray:
    """The program on float32 ``x`` (for tests: ONNX's meaning of each op)."""
    vals = [x.astype(np.float32)]
    for op, operands, params in program:
        args = [vals[i] if kind == "v" else np.float32(i) for kind, i in operands]
        vals.append(np.asarray(_NUMPY[op](*args, **params), np.float32))
    return vals[-1]


def _clip_np(x, min=None, max=None):  # noqa: A002 - ONNX's names
    return np.clip(x, -np.inf if min is None else min, np.inf if max is None else max)


_NUMPY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Relu": lambda x: np.maximum(x, 0), "Neg": np.negative, "Tanh": np.tanh,
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "HardSigmoid": lambda x, alpha, beta: np.clip(alpha * x + beta, 0, 1),
    "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, alpha: np.where(x >= 0, x, alpha * x),
    "Clip": _clip_np,
}


def builder(program: list, base, shape):
    """``index -> program(base(index))`` as TE expressions. ``Sigmoid`` and ``Tanh`` go
    through TOPI's vectorizable ``fast_exp`` / ``fast_tanh`` (their blocks are inlined
    into the epilogue by the schedule rule)."""
    from tvm import te, tirx, topi

    fns = [base]

    def operand(kind, i):
        if kind == "v":
            return fns[i]
        c = tirx.const(float(i), "float32")
        return lambda *idx: c

    for op, operands, params in program:
        args = [operand(kind, i) for kind, i in operands]
        fns.append(_te_step(op, args, params, shape, te, tirx, topi))
    return fns[-1]


def _te_step(op, args, params, shape, te, tirx, topi):
    f32 = "float32"
    zero, one = tirx.const(0.0, f32), tirx.const(1.0, f32)
    if op in _BINARY:
        a, b = args
        fn = {"Add": lambda u, v: u + v, "Sub": lambda u, v: u - v,
              "Mul": lambda u, v: u * v, "Div": lambda u, v: u / v}[op]
        return lambda *idx: fn(a(*idx), b(*idx))
    (x,) = args
    if op == "Relu":
        return lambda *idx: tirx.max(x(*idx), zero)
    if op == "Neg":
        return lambda *idx: zero - x(*idx)
    if op == "LeakyRelu":
        alpha = tirx.const(params["alpha"], f32)
        return lambda *idx: tirx.Select(x(*idx) >= zero, x(*idx), x(*idx) * alpha)
    if op in ("HardSigmoid", "HardSwish"):
        alpha = tirx.const(params.get("alpha", 1.0 / 6.0), f32)
        beta = tirx.const(params.get("beta", 0.5), f32)

        def hard(*idx):
            return tirx.min(tirx.max(x(*idx) * alpha + beta, zero), one)

        return hard if op == "HardSigmoid" else (lambda *idx: x(*idx) * hard(*idx))
    if op == "Clip":
        low, high = params["min"], params["max"]

        def clip(*idx):
            v = x(*idx)
            if low is not None:
                v = tirx.max(v, tirx.const(low, f32))
            if high is not None:
                v = tirx.min(v, tirx.const(high, f32))
            return v

        return clip
    if op == "Sigmoid":
        e = topi.fast_exp(te.compute(shape, lambda *idx: zero - x(*idx), name="kiln_int8_neg"))
        return lambda *idx: one / (one + e(*idx))
    if op == "Tanh":
        t = topi.fast_tanh(te.compute(shape, lambda *idx: x(*idx), name="kiln_int8_tanh_arg"))
        return lambda *idx: t(*idx)
    raise ValueError(f"no epilogue step for {op}")
