"""ONNX ``Attention`` (opset 23) lowered by kiln as Relax matmuls and a softmax.

TVM 0.27's table maps ``Attention`` to its converter for com.microsoft's op (it reads
a ``num_heads`` attribute the standard op does not have). The standard op, as the ONNX
reference computes it::

    Q, K, V      [B, H, S, D] (3-D [B, S, H*D] inputs split with q_num_heads/kv_num_heads)
    K, V         past_key/past_value concatenated in front (present_key/present_value)
    K, V         heads repeated when H_q is a multiple of H_kv (grouped-query attention)
    QK = (Q * sqrt(scale)) @ (K * sqrt(scale))^T        scale = 1/sqrt(D) by default
    QK = softcap * tanh(QK / softcap)                    (softcap > 0)
    P  = softmax(QK + bias)       bias: attn_mask (bool: 0/-inf, padded with -inf) and the
                                  causal mask aligned bottom-right (offset = past length)
                                  and the sliding window (left/right_window_size)
    P  = 0 on rows the bias masks entirely; Y = P @ V (3-D: back to [B, S, H*D])

float16/bfloat16 inputs are computed in float32. ``nonpad_kv_seqlen`` is refused.

``qk_matmul_output`` is QK (modes 0, 1), QK + bias (2) or P (3).
"""

from __future__ import annotations

import numpy as np

from .expr_types import dtype_of, static_shape

#: The bias of a masked position: finite, because kiln's CPU build may use fast math
#: (LLVM then assumes no infinities, and an all -inf row's guard vanished: NaN rows).
MASKED = -1e30
#: A row whose largest bias is below this is masked entirely (P = 0).
FULLY_MASKED = MASKED / 2


class AttentionAttributeError(ValueError):
    """An Attention kiln cannot lower (the importer reports the node)."""


def _heads_first(bb, x, heads: int):
    """``[B, S, H*D]`` -> ``[B, H, S, D]``."""
    from tvm import relax

    b, s, hidden = static_shape(x)
    if hidden % heads:
        raise AttentionAttributeError(f"hidden size {hidden} is not a multiple of {heads} heads")
    x = bb.emit(relax.op.reshape(x, [b, s, heads, hidden // heads]))
    return bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))


def _mask_bias(bb, mask, kv_len: int, dtype: str):
    """An attn_mask as an additive bias (bool: 0 / MASKED), its last dim padded to kv_len."""
    from tvm import relax

    op = relax.op
    shape = static_shape(mask)
    if dtype_of(mask) == "bool":
        mask = bb.emit(op.where(mask, relax.const(0.0, dtype), relax.const(MASKED, dtype)))
    else:
        if dtype_of(mask) != dtype:
            mask = bb.emit(op.astype(mask, dtype))
        # -inf in a float mask (a masked position) becomes MASKED too
        mask = bb.emit(op.maximum(mask, relax.const(MASKED, dtype)))
    pad = kv_len - shape[-1]
    if pad > 0:
        fill = relax.const(np.full(shape[:-1] + [pad], MASKED, dtype))
        mask = bb.emit(op.concat([mask, fill], axis=-1))
    return mask


class StandardAttention:
    """ONNX ``Attention`` (opset 23+), see the module docstring."""

    def get_converter(self, opset: int):
        def convert(bb, inputs, attr, params):
            return self.lower(bb, list(inputs) + [None] * 7, attr)

        return convert

    def lower(self, bb, inputs, attr):
        from tvm import relax

        if inputs[6] is not None:
            raise AttentionAttributeError("nonpad_kv_seqlen (opset 24) is not supported")
        dtype = dtype_of(inputs[0])
        if dtype == "float32":
            return self.lower_float32(bb, inputs, attr)
        # float16/bfloat16: computed in float32 as the reference does, outputs cast back
        up = [None if x is None else
              bb.emit(relax.op.astype(x, "float32")) if dtype_of(x) == dtype else x
              for x in inputs[:6]]
        outs = self.lower_float32(bb, up + [None], attr)
        return relax.Tuple([bb.emit(relax.op.astype(bb.emit(o), dtype)) for o in outs.fields])

    def lower_float32(self, bb, inputs, attr):
        from tvm import relax

        op = relax.op
        q, k, v, mask, past_k, past_v = inputs[:6]
        dtype = dtype_of(q)
        rank = len(static_shape(q))
        if rank == 3:
            if "q_num_heads" not in attr or "kv_num_heads" not in attr:
                raise AttentionAttributeError("3-D inputs need q_num_heads and kv_num_heads")
            q = _heads_first(bb, q, int(attr["q_num_heads"]))
            k = _heads_first(bb, k, int(attr["kv_num_heads"]))
            v = _heads_first(bb, v, int(attr["kv_num_heads"]))
        elif rank != 4:
            raise AttentionAttributeError(f"Q has {rank} dims, expected 3 or 4")
        if (past_k is None) != (past_v is None):
            raise AttentionAttributeError("past_key and past_value must be given together")
        past_len = static_shape(past_k)[2] if past_k is not None else 0
        if past_k is not None:
            k = bb.emit(op.concat([past_k, k], axis=2))
            v = bb.emit(op.concat([past_v, v], axis=2))
        present_k, present_v = k, v
        q_heads, q_len, head = static_shape(q)[1:]
        kv_heads, kv_len = static_shape(k)[1:3]
        if q_heads != kv_heads:
            if q_heads % kv_heads:
                raise AttentionAttributeError(f"{q_heads} query heads for {kv_heads} kv heads")
            k = bb.emit(op.repeat(k, q_heads // kv_heads, axis=1))
            v = bb.emit(op.repeat(v, q_heads // kv_heads, axis=1))
        scale = attr.get("scale")
        root = np.sqrt(float(scale) if scale is not None else 1.0 / np.sqrt(head))
        root = relax.const(np.asarray(root, dtype), dtype)
        qk = bb.emit(op.matmul(op.multiply(q, root),
                               op.permute_dims(op.multiply(k, root), [0, 1, 3, 2])))
        softcap = float(attr.get("softcap", 0.0))
        if softcap > 0:
            cap = relax.const(softcap, dtype)
            qk = bb.emit(op.multiply(op.tanh(op.divide(qk, cap)), cap))
        bias = self.bias(bb, mask, attr, q_len, kv_len, past_len, dtype)
        scores = qk if bias is None else bb.emit(op.add(qk, bias))
        probs = bb.emit(op.nn.softmax(scores, axis=-1))
        if bias is not None:
            # rows the bias masks entirely: 0, not softmax's NaN
            masked = op.less(op.max(bias, axis=-1, keepdims=True),
                             relax.const(FULLY_MASKED, dtype))
            probs = bb.emit(op.where(masked, relax.const(0.0, dtype), probs))
        y = bb.emit(op.matmul(probs, v))
        if rank == 3:
            b = static_shape(y)[0]
            y = bb.emit(op.reshape(op.permute_dims(y, [0, 2, 1, 3]),
                                   [b, q_len, q_heads * static_shape(y)[3]]))
        mode = int(attr.get("qk_matmul_output_mode", 0))
        if mode == 2 and bias is not None:
            # masked positions read -inf, as ONNX writes them
            scores = bb.emit(op.where(op.less(scores, relax.const(FULLY_MASKED, dtype)),
                                      relax.const(-np.inf, dtype), scores))
        qk_out = {2: scores, 3: probs}.get(mode, qk)
        return relax.Tuple([y, present_k, present_v, qk_out])

    @staticmethod
    def bias(bb, mask, attr, q_len: int, kv_len: int, past_len: int, dtype: str):
        """The additive bias (mask and causal), or None without either."""
        from tvm import relax

        bias = None if mask is None else _mask_bias(bb, mask, kv_len, dtype)
        # query i (absolute position i + past_len) against key j
        diff = np.arange(q_len)[:, None] + past_len - np.arange(kv_len)[None, :]
        allowed = np.ones(diff.shape, bool)
        if int(attr.get("is_causal", 0)):
            allowed &= diff >= 0
        left, right = int(attr.get("left_window_size", -1)), int(attr.get("right_window_size", -1))
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        if not allowed.all() or int(attr.get("is_causal", 0)):
            static = relax.const(np.where(allowed, 0.0, MASKED).astype(dtype))
            bias = static if bias is None else bb.emit(relax.op.add(bias, static))
        return bias
