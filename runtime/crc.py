"""crc32 arithmetic: of an array's bytes, and of two byte runs joined (so a file's pieces can
be checked on several threads and their crcs combined)."""

from __future__ import annotations

import zlib

import numpy as np


def crc32(array: np.ndarray) -> int:
    """crc32 of the array's bytes in C order, whatever its strides."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A+B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, which Python's
    zlib does not expose): crc1 is advanced over len2 zero bytes by squaring the GF(2)
    operator of one zero bit, ~2.5 ms here for lengths of gigabytes."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    odd = _square(_square(odd))  # four zero bits; the loop starts at one zero byte
    while len2:
        even = _square(odd)
        if len2 & 1:
            crc1 = _times(even, crc1)
        len2 >>= 1
        odd, even = even, odd
    return crc1 ^ crc2
