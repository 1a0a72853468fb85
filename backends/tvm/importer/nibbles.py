"""kiln's layouts of 4-bit codes packed two per byte (numpy side; :mod:`.decode` reads them).

TVM 0.27 cannot read 4-bit initializers (numpy keeps one int4 per byte, TVM packs
two), so the importer stores 4-bit weights as ``uint8`` nibbles in one of two layouts:

- flat, ONNX order (:func:`pack_nibbles`): code ``2j`` in the low nibble of byte ``j``,
  ``2j + 1`` in the high nibble;
- 32-column tiles (:func:`pack_nibbles_tiled`) for a weight whose output-channel count
  is a multiple of :data:`TILE_COLUMNS` (2-D, or a conv's ``[O, I, kh, kw]`` with ``k``
  the flat ``(I, kh, kw)``): ``P[n // 32, k, n % 16]``, low nibble column ``n``, high
  nibble ``n + 16``, so that a 16-byte load decodes into two vectors of consecutive
  columns.
"""

from __future__ import annotations

import numpy as np

#: Output columns per nibble tile: a byte holds column ``j`` (low nibble) and ``j + 16``
#: (high nibble) of a 32-column tile, so one 16-byte load unpacks to two 16-lane vectors.
TILE_COLUMNS = 32
#: Columns per nibble half of a tile (the bytes of one tile row).
HALF_TILE = TILE_COLUMNS // 2


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (one per uint8, values 0..15) two per byte, ONNX order.

    When the last dim is even, rows stay byte-aligned and the result keeps the
    shape with the last dim halved; otherwise the tensor is packed flat.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8) & 0xF
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[0::2] | (flat[1::2] << 4)
    if codes.ndim and codes.shape[-1] % 2 == 0:
        return packed.reshape(codes.shape[:-1] + (codes.shape[-1] // 2,))
    return packed


def column_axis(shape: list[int], axis: int, block_size: int, *, scale_rank: int) -> int:
    """The output-channel axis of a 4-bit weight to tile nibbles along, or -1 (flat).

    2-D (a MatMul/Gemm weight), blocked (``block_size``): the other axis than the
    blocked one; per axis: ``axis`` itself; per tensor: the last. 3-D and up (a conv
    weight ``[O, I, kh, ...]``): axis 0, the output channels. Only weights whose
    column count is a multiple of :data:`TILE_COLUMNS` are tiled.
    """
    if len(shape) >= 3:
        return 0 if shape[0] % TILE_COLUMNS == 0 else -1
    if len(shape) != 2:
        return -1
    axis = axis + 2 if axis < 0 else axis
    if block_size:
        col = 1 - axis
    elif scale_rank == 1:
        col = axis
    else:
        col = 1
    return col if shape[col] % TILE_COLUMNS == 0 else -1


def pack_nibbles_tiled(codes: np.ndarray, col_axis: int) -> np.ndarray:
    """Pack a code matrix as ``P[c // 32, r, c % 16]``, nibble ``(c % 32) // 16``.

    ``c`` is the index along ``col_axis``, ``r`` the (C-order flat) index along the
    other axes: each 32-column tile is one contiguous ``[R, 16]`` byte panel that a
    GEMV streams along R, and a conv's panel decode reads 16 bytes per ``r``.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8) & 0xF
    if codes.ndim > 2:  # [O, I, kh, kw]: columns O, rows the flat (I, kh, kw)
        codes = codes.reshape(codes.shape[0], -1)
    by_col = codes if col_axis == 1 else codes.T  # [R, C]
    rows, cols = by_col.shape
    tiles = by_col.reshape(rows, cols // TILE_COLUMNS, 2, HALF_TILE).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(tiles[:, :, 0, :] | (tiles[:, :, 1, :] << 4))


def pack_codes(codes: np.ndarray, col_axis: int) -> np.ndarray:
    """``codes`` tiled along ``col_axis`` (:func:`pack_nibbles_tiled`), or flat when -1."""
    return pack_nibbles(codes) if col_axis < 0 else pack_nibbles_tiled(codes, col_axis)
