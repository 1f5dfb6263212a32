"""Integer code storage: 2..4-bit codes two per byte, 5..8-bit codes as int8.

A code c in [-2^(b-1), 2^(b-1)-1] is stored as the nibble c + 8 (int4 storage holds
every b <= 4). Column 2k goes to the low nibble of byte k, column 2k+1 to the high
nibble; an odd column count pads one zero nibble per row.
"""

from __future__ import annotations

import numpy as np

INT4 = "int4x2"
INT8 = "int8"


def qmax(bits: int) -> int:
    """Largest code of a signed symmetric ``bits``-bit grid; codes clamp to [-qmax-1, qmax]."""
    return 2 ** (bits - 1) - 1


def storage_for_bits(bits: int) -> str:
    return INT4 if bits <= 4 else INT8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int codes [out, in] -> stored array (uint8 [out, ceil(in/2)] or int8 [out, in])."""
    codes = np.asarray(codes)
    if storage_for_bits(bits) == INT8:
        return codes.astype(np.int8)
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)), constant_values=8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def scale_groups(width: int, group_size: int) -> int:
    """How many scales a row of ``width`` codes has with ``group_size`` columns per scale (0:
    one per row); a ValueError when the groups do not tile the row."""
    if group_size == 0:
        return 1
    if group_size < 0 or width % group_size:
        raise ValueError(f"groups of {group_size} columns do not tile a row of {width}")
    return width // group_size
