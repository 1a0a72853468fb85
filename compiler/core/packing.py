"""How low-bit codes are stored (numpy): bit packing and the value tables of FP4/FP8.

Bit packing is ``kiln.UnpackBits``'s layout (:mod:`kiln.compiler.core.kiln_domain`):
code i (C order) occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream,
so every run of 8 codes is ``bits`` bytes. The passes pack with :func:`pack_bits`; the
TVM importer evaluates small index masks before import with :func:`unpack_bits`.

An FP4 code is ``sign << 3 | magnitude index`` (OCP MX / ONNX FLOAT4E2M1 for E2M1);
:func:`fp4_table` gives its 16 values.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

#: FP4 E2M1 magnitudes (OCP MX / ONNX FLOAT4E2M1: exponent bits 2-1, mantissa bit 0).
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
#: kiln's E3M0: 3 exponent bits, no mantissa, exponent 0 is zero (bias 3).
E3M0_MAGNITUDES = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
#: FP4 magnitudes by the weight dtype names of the quantization config.
FP4_MAGNITUDES = {"fp4_e2m1": E2M1_MAGNITUDES, "fp4_e3m0": E3M0_MAGNITUDES}
#: FP8 element types by the weight dtype names of the quantization config.
FP8_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def fp4_table(dtype: str) -> np.ndarray:
    """The 16 float32 values of an FP4 code (index = sign<<3 | magnitude index)."""
    magnitudes = FP4_MAGNITUDES[dtype]
    return np.concatenate([magnitudes, -magnitudes]).astype(np.float32)


#: FP4 E2M1 code -> value (ONNX FLOAT4E2M1 bit patterns).
FP4_E2M1_VALUES = fp4_table("fp4_e2m1")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2^bits) into bytes: each run of 8 codes (C order, zero
    padded) becomes ``bits`` bytes of the little-endian word sum_j code_j << (j*bits)."""
    flat = codes.reshape(-1).astype(np.uint64)
    pad = (-flat.size) % 8
    runs = np.concatenate([flat, np.zeros(pad, dtype=np.uint64)]).reshape(-1, 8)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(runs << shifts[None, :], axis=1)
    out = np.stack([(words >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(bits)], axis=1)
    return out.reshape(-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, shape) -> np.ndarray:
    """``kiln.UnpackBits`` in numpy (the inverse of :func:`pack_bits`): uint8 codes of ``shape``.

    Code i is bits ``[i*bits, (i+1)*bits)`` of ``packed``'s little-endian bit stream;
    bytes past the last code (padding) are ignored.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    stream = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), bitorder="little")
    if stream.size < n * bits:
        raise ValueError(f"{stream.size // 8} packed bytes hold fewer than {n} {bits}-bit codes")
    fields = stream[: n * bits].reshape(n, bits).astype(np.uint16)
    codes = (fields << np.arange(bits, dtype=np.uint16)).sum(axis=1)
    return codes.astype(np.uint8).reshape(shape)
