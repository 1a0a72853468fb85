"""ONNX ``RotaryEmbedding`` (opset 23) lowered by kiln as Relax ops (TVM 0.27 has none).

With ``x`` as ``[B, S, H, D]`` (4-D inputs are ``[B, H, S, D]``; 3-D ``[B, S, H*D]`` split
with ``num_heads``), the first ``rotary_embedding_dim`` channels are rotated in pairs
``(x1, x2)`` (halves, or even/odd channels when ``interleaved``)::

    cos, sin = cos_cache[position_ids], sin_cache[position_ids]     # [B, S, 1, R/2]
    (x1, x2) -> (cos*x1 - sin*x2, sin*x1 + cos*x2)

and the other channels pass through.
"""

from __future__ import annotations

from .expr_types import static_shape


class RotaryAttributeError(ValueError):
    """A RotaryEmbedding kiln cannot lower (the importer reports the node)."""


class RotaryEmbedding:
    """ONNX ``RotaryEmbedding``, see the module docstring."""

    @classmethod
    def get_converter(cls, opset: int):
        def convert(bb, inputs, attr, params):
            return cls.lower(bb, list(inputs) + [None], attr)

        return convert

    @staticmethod
    def lower(bb, inputs, attr):
        from tvm import relax

        op = relax.op
        x, cos, sin, positions = inputs[:4]
        shape = static_shape(x)
        if len(shape) == 4:
            x = bb.emit(op.permute_dims(x, [0, 2, 1, 3]))
        elif len(shape) == 3:
            heads = int(attr.get("num_heads", 0))
            if heads <= 0 or shape[2] % heads:
                raise RotaryAttributeError("3-D input needs num_heads dividing its hidden size")
            x = bb.emit(op.reshape(x, [shape[0], shape[1], heads, shape[2] // heads]))
        else:
            raise RotaryAttributeError(f"input has {len(shape)} dims, expected 3 or 4")
        b, s, h, d = static_shape(x)
        rot = int(attr.get("rotary_embedding_dim", 0)) or d
        if rot % 2 or rot > d:
            raise RotaryAttributeError(f"rotary_embedding_dim={rot} for head size {d}")
        if positions is not None:
            cos = op.take(cos, positions, axis=0)
            sin = op.take(sin, positions, axis=0)
        cos = bb.emit(op.expand_dims(cos, 2))
        sin = bb.emit(op.expand_dims(sin, 2))
        part = bb.emit(op.strided_slice(x, axes=[3], begin=[0], end=[rot])) if rot < d else x
        interleaved = int(attr.get("interleaved", 0)) == 1
        if interleaved:
            x1 = op.strided_slice(part, axes=[3], begin=[0], end=[rot], strides=[2])
            x2 = op.strided_slice(part, axes=[3], begin=[1], end=[rot], strides=[2])
        else:
            halves = bb.emit(op.split(part, 2, axis=3))
            x1, x2 = relax.TupleGetItem(halves, 0), relax.TupleGetItem(halves, 1)
        x1, x2 = bb.emit(x1), bb.emit(x2)
        real = op.subtract(op.multiply(cos, x1), op.multiply(sin, x2))
        imag = op.add(op.multiply(sin, x1), op.multiply(cos, x2))
        if interleaved:
            rotated = op.reshape(op.stack([real, imag], axis=4), [b, s, h, rot])
        else:
            rotated = op.concat([real, imag], axis=3)
        y = bb.emit(rotated)
        if rot < d:
            rest = op.strided_slice(x, axes=[3], begin=[rot], end=[d])
            y = bb.emit(op.concat([y, rest], axis=3))
        if len(shape) == 4:
            return op.permute_dims(y, [0, 2, 1, 3])
        return op.reshape(y, shape)
