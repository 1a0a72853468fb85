"""ONNX ``LSTM``, ``GRU`` and ``RNN`` lowered by kiln (TVM 0.27's importer has none).

A static sequence length ``T`` is unrolled over time, per direction:

1. one input projection for all steps, ``XW = X[T*B, I] @ W^T + b`` (a GEMM; the biases
   that do not depend on the state are folded in), split into ``T`` slices;
2. per step, the recurrent GEMV ``h @ R^T`` (through kiln's contraction rule: ``R^T`` is
   a constant when ``R`` is one) plus the gates, elementwise.

Gate order (ONNX): LSTM ``i, o, f, c``; GRU ``z, r, h``. With ``f, g, h`` the
activations (defaults Sigmoid, Tanh, Tanh)::

    LSTM  i = f(Xi + Hi + Pi*C)  f = f(Xf + Hf + Pf*C)  c~ = g(Xc + Hc)
          C' = f*C + i*c~        o = f(Xo + Ho + Po*C')  H' = o * h(C')
    GRU   z = f(Xz + Hz)  r = f(Xr + Hr)
          h~ = g(Xh + (r*H) Rh^T + Rbh)      (linear_before_reset = 0)
          h~ = g(Xh + r*(H Rh^T + Rbh))      (linear_before_reset = 1)
          H' = (1 - z)*h~ + z*H
    RNN   H' = f(Xi + Hi)

``clip`` bounds every gate's pre-activation. With ``sequence_lens``, batch entry ``b``
keeps its state and writes zeros to ``Y`` at steps ``t >= len[b]`` (a reverse direction
then starts at ``len[b] - 1``, as ONNX Runtime does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .expr_types import attr_str, dtype_of, static_shape

#: Activations that read ``activation_alpha`` / ``activation_beta`` and their ONNX defaults.
_ALPHA_DEFAULTS = {"affine": 1.0, "leakyrelu": 0.01, "thresholdedrelu": 1.0,
                   "scaledtanh": 1.0, "hardsigmoid": 0.2, "elu": 1.0}
_BETA_DEFAULTS = {"affine": 0.0, "scaledtanh": 1.0, "hardsigmoid": 0.5}
ACTIVATIONS = frozenset({"sigmoid", "tanh", "relu", "softsign", "softplus"}
                        | set(_ALPHA_DEFAULTS))


class RecurrentAttributeError(ValueError):
    """An LSTM/GRU/RNN attribute kiln cannot lower (the importer reports the node)."""


@dataclass(frozen=True)
class Activation:
    """One of ONNX's recurrent activation functions with its alpha/beta."""

    name: str
    alpha: float = 0.0
    beta: float = 0.0

    def __call__(self, bb, x):
        from tvm import relax

        op = relax.op
        dtype = dtype_of(x)

        def c(v):
            return relax.const(v, dtype)

        name, a, b = self.name, self.alpha, self.beta
        if name == "sigmoid":
            y = op.sigmoid(x)
        elif name == "tanh":
            y = op.tanh(x)
        elif name == "relu":
            y = op.nn.relu(x)
        elif name == "softsign":
            y = op.divide(x, op.add(op.abs(x), c(1.0)))
        elif name == "softplus":
            y = op.log(op.add(op.exp(x), c(1.0)))
        elif name == "affine":
            y = op.add(op.multiply(x, c(a)), c(b))
        elif name == "leakyrelu":
            y = op.where(op.less(x, c(0.0)), op.multiply(x, c(a)), x)
        elif name == "thresholdedrelu":
            y = op.where(op.greater(x, c(a)), x, c(0.0))
        elif name == "scaledtanh":
            y = op.multiply(op.tanh(op.multiply(x, c(b))), c(a))
        elif name == "hardsigmoid":
            y = op.minimum(op.maximum(op.add(op.multiply(x, c(a)), c(b)), c(0.0)), c(1.0))
        elif name == "elu":
            y = op.where(op.less(x, c(0.0)), op.multiply(op.subtract(op.exp(x), c(1.0)), c(a)), x)
        else:  # pragma: no cover - names are checked in parse_activations
            raise RecurrentAttributeError(f"activation {name!r}")
        return bb.emit(y)


def parse_activations(attr, per_direction: list[str], directions: int) -> list[list[Activation]]:
    """Per direction, the activations of ``attr`` (ONNX defaults ``per_direction``).

    ``activation_alpha`` / ``activation_beta`` are consumed in order by the activations
    that take them; one missing takes that function's ONNX default.
    """
    names = [attr_str(n) for n in attr.get("activations", ())] or per_direction * directions
    count = len(per_direction)
    if len(names) != count * directions:
        raise RecurrentAttributeError(
            f"activations lists {len(names)} functions, expected {count * directions}")
    alphas = [float(a) for a in attr.get("activation_alpha", ())]
    betas = [float(b) for b in attr.get("activation_beta", ())]
    parsed = []
    for raw in names:
        name = raw.lower()
        if name not in ACTIVATIONS:
            raise RecurrentAttributeError(f"unsupported activation {raw!r}")
        alpha = alphas.pop(0) if name in _ALPHA_DEFAULTS and alphas else \
            _ALPHA_DEFAULTS.get(name, 0.0)
        beta = betas.pop(0) if name in _BETA_DEFAULTS and betas else _BETA_DEFAULTS.get(name, 0.0)
        parsed.append(Activation(name, alpha, beta))
    return [parsed[d * count:(d + 1) * count] for d in range(directions)]


def _direction_slice(bb, expr, d: int):
    """``expr[d]`` of a ``[D, ...]`` tensor (a constant when ``expr`` is one)."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.GenericConst):
        return relax.const(np.ascontiguousarray(expr.value.numpy()[d]))
    part = relax.op.strided_slice(expr, axes=[0], begin=[d], end=[d + 1])
    return bb.emit(relax.op.squeeze(part, [0]))


def _transposed(bb, expr):
    """``expr^T`` of a 2-D tensor, folded when it is a constant (a weight for the GEMV)."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.GenericConst):
        return relax.const(np.ascontiguousarray(expr.value.numpy().T))
    return bb.emit(relax.op.permute_dims(expr, [1, 0]))


def _columns(bb, expr, start: int, stop: int):
    """``expr[:, start:stop]`` of a ``[B, N]`` tensor (or ``[N]`` vector: ``expr[start:stop]``)."""
    import tvm
    from tvm import relax

    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value.numpy()
        return relax.const(np.ascontiguousarray(value[..., start:stop]))
    axis = len(static_shape(expr)) - 1
    return bb.emit(relax.op.strided_slice(expr, axes=[axis], begin=[start], end=[stop]))


@dataclass
class _Node:
    """One recurrent node's inputs, in ``[T, B, ...]`` layout, and attributes."""

    x: object
    w: object
    r: object
    b: object | None
    lengths: object | None
    initial: list  # initial_h (and initial_c for LSTM), [D, B, H] or None
    peepholes: object | None
    hidden: int
    directions: list[bool]  # per direction: reversed?
    activations: list[list[Activation]]
    clip: float | None
    layout: int
    steps: int
    batch: int
    dtype: str


class _RecurrentOp:
    """Shared lowering of LSTM/GRU/RNN; subclasses give the gates and the cell."""

    gates: int = 1
    states: int = 1
    default_activations: list[str] = ["Tanh"]

    def get_converter(self, opset: int):
        def convert(bb, inputs, attr, params):
            return self.lower(bb, self.parse(bb, list(inputs), attr), attr)

        return convert

    def parse(self, bb, inputs, attr) -> _Node:
        from tvm import relax

        inputs = inputs + [None] * (8 - len(inputs))
        x, w, r, b, lengths, initial_h = inputs[:6]
        if len(static_shape(x)) != 3:
            raise RecurrentAttributeError(f"X has shape {static_shape(x)}, expected 3 dims")
        layout = int(attr.get("layout", 0))
        if layout not in (0, 1):
            raise RecurrentAttributeError(f"layout={layout}")
        direction = attr_str(attr.get("direction", "forward"))
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}
        if direction not in reverse:
            raise RecurrentAttributeError(f"direction={direction!r}")
        hidden = int(attr.get("hidden_size", static_shape(r)[-1]))
        if layout == 1:
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        initial = [initial_h] + ([inputs[6]] if self.states == 2 else [])
        if layout == 1:
            initial = [None if s is None else bb.emit(relax.op.permute_dims(s, [1, 0, 2]))
                       for s in initial]
        steps, batch, _ = static_shape(x)
        clip = attr.get("clip")
        return _Node(x=x, w=w, r=r, b=b, lengths=lengths, initial=initial,
                     peepholes=inputs[7] if self.states == 2 else None, hidden=hidden,
                     directions=reverse[direction],
                     activations=parse_activations(attr, self.default_activations,
                                                   len(reverse[direction])),
                     clip=None if clip is None else float(clip), layout=layout,
                     steps=steps, batch=batch, dtype=dtype_of(x))

    # -- the time loop -------------------------------------------------------------------

    def lower(self, bb, node: _Node, attr):
        from tvm import relax

        op = relax.op
        sequences, finals = [], [[] for _ in range(self.states)]
        flat = bb.emit(op.reshape(node.x, [node.steps * node.batch, static_shape(node.x)[2]]))
        for d, backwards in enumerate(node.directions):
            step = self.direction(bb, node, d, attr)
            bias = self.input_bias(bb, node, d, attr)
            xw = op.matmul(flat, _transposed(bb, _direction_slice(bb, node.w, d)))
            if bias is not None:
                xw = op.add(xw, bias)
            # [T*B, G*H] split into T row blocks [B, G*H]: no squeeze for the GEMV's
            # epilogue to read through (the contraction rule takes a plain addend)
            xw = bb.emit(xw)
            # (relax's split into one section is the tensor itself, not a 1-tuple)
            pieces = bb.emit(op.split(xw, node.steps, axis=0)) if node.steps > 1 else None
            state = [self.initial_state(bb, node, s, d) for s in range(self.states)]
            outputs: list = [None] * node.steps
            order = range(node.steps - 1, -1, -1) if backwards else range(node.steps)
            for t in order:
                x_t = xw if pieces is None else bb.emit(relax.TupleGetItem(pieces, t))
                new = step(x_t, state)
                mask = self.step_mask(bb, node, t)
                if mask is not None:
                    new = [bb.emit(op.where(mask, n, s)) for n, s in zip(new, state)]
                    outputs[t] = bb.emit(op.where(mask, new[0], relax.const(0.0, node.dtype)))
                else:
                    outputs[t] = new[0]
                state = new
            sequences.append(bb.emit(op.stack(outputs, axis=0)))  # [T, B, H]
            for s in range(self.states):
                finals[s].append(state[s])
        y = bb.emit(op.stack(sequences, axis=1))  # [T, D, B, H]
        results = [y] + [bb.emit(op.stack(f, axis=0)) for f in finals]  # [D, B, H]
        if node.layout == 1:
            results = [bb.emit(op.permute_dims(results[0], [2, 0, 1, 3]))] + \
                [bb.emit(op.permute_dims(s, [1, 0, 2])) for s in results[1:]]
        return relax.Tuple(results)

    def initial_state(self, bb, node: _Node, s: int, d: int):
        from tvm import relax

        given = node.initial[s]
        if given is None:
            return relax.const(np.zeros((node.batch, node.hidden), node.dtype))
        return _direction_slice(bb, given, d)

    def step_mask(self, bb, node: _Node, t: int):
        """``[B, 1]`` bool: which batch entries step ``t`` updates (None: all of them)."""
        import tvm
        from tvm import relax

        lengths = node.lengths
        if lengths is None:
            return None
        if isinstance(lengths, tvm.ir.GenericConst):
            valid = lengths.value.numpy().reshape(-1) > t
            if valid.all():
                return None
            return relax.const(valid.reshape(-1, 1))
        valid = relax.op.less(relax.const(t, dtype_of(lengths)), lengths)
        return bb.emit(relax.op.reshape(valid, [node.batch, 1]))

    def bias_halves(self, bb, node: _Node, d: int):
        """``(Wb, Rb)`` of direction ``d`` (each ``[gates*H]``), or None without B."""
        if node.b is None:
            return None
        b = _direction_slice(bb, node.b, d)
        size = self.gates * node.hidden
        return _columns(bb, b, 0, size), _columns(bb, b, size, 2 * size)

    def input_bias(self, bb, node: _Node, d: int, attr):
        """The bias added to the input projection: ``Wb + Rb`` (GRU keeps ``Rbh`` apart)."""
        from tvm import relax

        halves = self.bias_halves(bb, node, d)
        return None if halves is None else bb.emit(relax.op.add(*halves))

    def pre(self, bb, node: _Node, x):
        """A gate's pre-activation, bounded by ``clip``."""
        from tvm import relax

        if node.clip is None:
            return x
        c = node.clip
        x = relax.op.maximum(x, relax.const(-c, node.dtype))
        return bb.emit(relax.op.minimum(x, relax.const(c, node.dtype)))

    def recurrent(self, bb, node: _Node, d: int, start: int = 0, stop: int | None = None):
        """``R[d][start:stop]^T`` for the per-step GEMV."""
        import tvm
        from tvm import relax

        r = _direction_slice(bb, node.r, d)
        stop = self.gates * node.hidden if stop is None else stop
        if isinstance(r, tvm.ir.GenericConst):
            return relax.const(np.ascontiguousarray(r.value.numpy()[start:stop].T))
        part = bb.emit(relax.op.strided_slice(r, axes=[0], begin=[start], end=[stop]))
        return _transposed(bb, part)

    def direction(self, bb, node: _Node, d: int, attr):
        """``step(x_t, state) -> new state`` for direction ``d``."""
        raise NotImplementedError


class LSTM(_RecurrentOp):
    """ONNX ``LSTM`` (peepholes, ``input_forget``, ``clip``, ``sequence_lens``, layouts)."""

    gates = 4
    states = 2
    default_activations = ["Sigmoid", "Tanh", "Tanh"]

    def direction(self, bb, node, d, attr):
        from tvm import relax

        op = relax.op
        f, g, h = node.activations[d]
        hidden = node.hidden
        r_t = self.recurrent(bb, node, d)
        coupled = int(attr.get("input_forget", 0)) == 1
        peep = None
        if node.peepholes is not None:
            p = _direction_slice(bb, node.peepholes, d)
            peep = [_columns(bb, p, k * hidden, (k + 1) * hidden) for k in range(3)]  # i, o, f

        def step(x_t, state):
            h_prev, c_prev = state
            gates = bb.emit(op.add(x_t, op.matmul(h_prev, r_t)))
            i, o, fg, c = (_columns(bb, gates, k * hidden, (k + 1) * hidden) for k in range(4))
            if peep is not None:
                i = bb.emit(op.add(i, op.multiply(peep[0], c_prev)))
                fg = bb.emit(op.add(fg, op.multiply(peep[2], c_prev)))
            i = f(bb, self.pre(bb, node, i))
            if coupled:
                fg = bb.emit(op.subtract(relax.const(1.0, node.dtype), i))
            else:
                fg = f(bb, self.pre(bb, node, fg))
            c_new = bb.emit(op.add(op.multiply(fg, c_prev),
                                   op.multiply(i, g(bb, self.pre(bb, node, c)))))
            if peep is not None:
                o = bb.emit(op.add(o, op.multiply(peep[1], c_new)))
            o = f(bb, self.pre(bb, node, o))
            return [bb.emit(op.multiply(o, h(bb, c_new))), c_new]

        return step


def _linear_before_reset(attr) -> bool:
    return int(attr.get("linear_before_reset", 0)) == 1


class GRU(_RecurrentOp):
    """ONNX ``GRU`` (``linear_before_reset``, ``clip``, ``sequence_lens``, layouts)."""

    gates = 3
    default_activations = ["Sigmoid", "Tanh"]

    def input_bias(self, bb, node, d, attr):
        from tvm import relax

        halves = self.bias_halves(bb, node, d)
        if halves is None:
            return None
        wb, rb = halves
        # Rbh is added inside the reset product when linear_before_reset = 1 (self.direction)
        keep = np.ones(3 * node.hidden, node.dtype)
        if _linear_before_reset(attr):
            keep[2 * node.hidden:] = 0.0
        return bb.emit(relax.op.add(wb, relax.op.multiply(rb, relax.const(keep))))

    def direction(self, bb, node, d, attr):
        from tvm import relax

        op = relax.op
        f, g = node.activations[d]
        hidden = node.hidden
        one = relax.const(1.0, node.dtype)
        r_zr = self.recurrent(bb, node, d, 0, 2 * hidden)
        r_h = self.recurrent(bb, node, d, 2 * hidden, 3 * hidden)
        before_reset = _linear_before_reset(attr)
        rb_h = None
        if before_reset and node.b is not None:
            rb_h = _columns(bb, self.bias_halves(bb, node, d)[1], 2 * hidden, 3 * hidden)

        def step(x_t, state):
            (h_prev,) = state
            zr = bb.emit(op.add(_columns(bb, x_t, 0, 2 * hidden), op.matmul(h_prev, r_zr)))
            # one activation over [z, r], split (not sliced) so that both are materialized:
            # a sigmoid fused into the candidate GEMV's epilogue is not the contraction
            # rule's form
            gates = bb.emit(op.split(f(bb, self.pre(bb, node, zr)), 2, axis=1))
            z = bb.emit(relax.TupleGetItem(gates, 0))
            r = bb.emit(relax.TupleGetItem(gates, 1))
            x_h = _columns(bb, x_t, 2 * hidden, 3 * hidden)
            if before_reset:
                hr = op.matmul(h_prev, r_h)
                if rb_h is not None:
                    hr = op.add(hr, rb_h)
                pre_h = op.add(x_h, op.multiply(r, hr))
            else:
                pre_h = op.add(x_h, op.matmul(op.multiply(r, h_prev), r_h))
            cand = g(bb, self.pre(bb, node, bb.emit(pre_h)))
            return [bb.emit(op.add(op.multiply(op.subtract(one, z), cand),
                                   op.multiply(z, h_prev)))]

        return step


class RNN(_RecurrentOp):
    """ONNX ``RNN`` (simple recurrence; ``clip``, ``sequence_lens``, layouts)."""

    gates = 1
    default_activations = ["Tanh"]

    def direction(self, bb, node, d, attr):
        from tvm import relax

        (f,) = node.activations[d]
        r_t = self.recurrent(bb, node, d)

        def step(x_t, state):
            (h_prev,) = state
            return [f(bb, self.pre(bb, node, bb.emit(relax.op.add(x_t,
                                                                   relax.op.matmul(h_prev, r_t)))))]

        return step
