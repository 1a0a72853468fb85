"""Bit packing of kiln.UnpackBits codes and the FP4 value tables (kiln.compiler.core.packing)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kiln.compiler.core.packing import (
    E2M1_MAGNITUDES,
    FP4_E2M1_VALUES,
    fp4_table,
    pack_bits,
    unpack_bits,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (5, 7), (3, 4, 5), (100,)])
def test_unpack_inverts_pack(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=shape).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size // 8) * bits
    out = unpack_bits(packed, bits, shape)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, codes)


def test_codes_are_consecutive_little_endian_bit_fields():
    """Code i is bits [3i, 3i+3) of the stream: 0..7 at 3 bits is the word
    sum_j j << 3j = 0xFAC688, stored low byte first."""
    codes = np.arange(8, dtype=np.uint8)
    np.testing.assert_array_equal(pack_bits(codes, 3), [0x88, 0xC6, 0xFA])
    np.testing.assert_array_equal(unpack_bits(np.array([0x88, 0xC6, 0xFA], np.uint8), 3, [8]),
                                  codes)


def test_padding_bytes_are_ignored_and_short_input_is_refused():
    packed = np.array([0b1011_0110, 0xFF], np.uint8)
    np.testing.assert_array_equal(unpack_bits(packed, 2, (3,)), [0b10, 0b01, 0b11])
    with pytest.raises(ValueError, match="fewer than 9 2-bit codes"):
        unpack_bits(packed, 2, (9,))
    with pytest.raises(ValueError, match="bits must be 1..8"):
        unpack_bits(packed, 9, (1,))


def test_fp4_e2m1_table_is_onnx_float4e2m1():
    """Code c decodes to the FLOAT4E2M1 value of the bit pattern c (ml_dtypes' decoding)."""
    want = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(FP4_E2M1_VALUES, want)
    np.testing.assert_array_equal(np.signbit(FP4_E2M1_VALUES), np.signbit(want))  # -0.0 at 8
    np.testing.assert_array_equal(fp4_table("fp4_e2m1"), FP4_E2M1_VALUES)
    assert FP4_E2M1_VALUES.dtype == np.float32


def test_fp4_tables_are_sign_magnitude():
    for dtype in ("fp4_e2m1", "fp4_e3m0"):
        table = fp4_table(dtype)
        assert table.shape == (16,)
        np.testing.assert_array_equal(table[8:], -table[:8])
        assert np.all(np.diff(table[:8]) > 0)
    np.testing.assert_array_equal(fp4_table("fp4_e2m1")[:8], E2M1_MAGNITUDES)
