"""kiln's packed 4-bit layouts (importer.nibbles): flat ONNX order and 32-column tiles."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.tvm.importer.nibbles import (
    TILE_COLUMNS,
    column_axis,
    pack_codes,
    pack_nibbles,
    pack_nibbles_tiled,
)


def test_flat_order_is_low_nibble_first():
    codes = np.array([[1, 2, 3, 4], [5, 6, 7, 15]], np.uint8)
    np.testing.assert_array_equal(pack_nibbles(codes), [[0x21, 0x43], [0x65, 0xF7]])
    # an odd last dim packs the tensor flat, the last byte padded with a zero nibble
    np.testing.assert_array_equal(pack_nibbles(np.array([[1, 2, 3]], np.uint8)), [0x21, 0x03])


def test_tiles_hold_column_n_and_n_plus_16_in_one_byte():
    """P[n // 32, k, n % 16]: low nibble column n, high nibble column n + 16."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (5, 64)).astype(np.uint8)  # [K, N], columns along axis 1
    packed = pack_nibbles_tiled(codes, 1)
    assert packed.shape == (2, 5, 16) and packed.dtype == np.uint8
    for n in range(64):
        byte = packed[n // TILE_COLUMNS, :, n % 16]
        nibble = byte & 15 if n % TILE_COLUMNS < 16 else byte >> 4
        np.testing.assert_array_equal(nibble, codes[:, n])
    np.testing.assert_array_equal(pack_nibbles_tiled(codes.T.copy(), 0), packed)


def test_conv_weight_tiles_over_output_channels():
    """[O, I, kh, kw]: the columns are O, the rows the flat (I, kh, kw)."""
    codes = np.random.default_rng(1).integers(0, 16, (32, 2, 3, 3)).astype(np.uint8)
    packed = pack_nibbles_tiled(codes, 0)
    assert packed.shape == (1, 18, 16)
    np.testing.assert_array_equal(packed[0, :, 3] & 15, codes[3].reshape(-1))
    np.testing.assert_array_equal(packed[0, :, 3] >> 4, codes[19].reshape(-1))


@pytest.mark.parametrize("shape, axis, block_size, scale_rank, want", [
    ([128, 64], 0, 32, 2, 1),     # MatMul W[K, N] blocked along K: tiles along N
    ([64, 128], 1, 32, 2, 0),     # blocked along axis 1: tiles along axis 0
    ([64, 96], 1, 0, 1, 1),       # per axis 1
    ([96, 64], 0, 0, 0, 1),       # per tensor: the last axis
    ([128, 48], 0, 32, 2, -1),    # 48 columns: not whole tiles, flat
    ([64, 16, 3, 3], 1, 0, 1, 0),  # conv: output channels
    ([24, 16, 3, 3], 1, 0, 1, -1),
    ([64], 0, 0, 0, -1),
])
def test_column_axis(shape, axis, block_size, scale_rank, want):
    assert column_axis(shape, axis, block_size, scale_rank=scale_rank) == want


def test_pack_codes_chooses_the_layout():
    codes = np.random.default_rng(2).integers(0, 16, (4, 32)).astype(np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, -1), pack_nibbles(codes))
    np.testing.assert_array_equal(pack_codes(codes, 1), pack_nibbles_tiled(codes, 1))
