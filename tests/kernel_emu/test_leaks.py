"""The leak oracle's word search: every way of looking finds the same words."""

from __future__ import annotations

import random
import struct

from kernel_emu.allocations import Allocation
from kernel_emu.leaks import WORDS_AT_ONCE, _held, _holds_word


def test_a_set_of_words_and_a_search_per_key_agree() -> None:
    rng = random.Random(7)
    for _ in range(200):
        start = 0x300000 + rng.randrange(16)
        size = rng.choice((0, 3, 8, 9, 64, 1000, WORDS_AT_ONCE, WORDS_AT_ONCE + 24))
        data = bytearray(rng.randbytes(size))
        wanted: dict[int, Allocation] = {}
        for _ in range(rng.randrange(1, 6)):
            ptr = 0x300000 + rng.randrange(0x10000)
            wanted[ptr] = Allocation(len(wanted) + 1, ptr, 8)
            if size >= 16 and rng.random() < 0.6:  # plant it, aligned or not
                at = rng.randrange(size - 8)
                data[at:at + 8] = struct.pack("<Q", ptr)
        found = _held(bytes(data), start, wanted)
        assert found == [p for p in wanted if _holds_word(bytes(data), start, p)]
        for ptr in found:  # really there, 8-aligned in the address space
            at = bytes(data).find(struct.pack("<Q", ptr))
            assert at >= 0


def test_only_aligned_words_count() -> None:
    ptr = 0x30_0028
    wanted = {ptr: Allocation(1, ptr, 8)}
    data = bytes(3) + struct.pack("<Q", ptr) + bytes(5)
    assert _held(data, 0x1000, wanted) == []  # at 0x1003
    assert _held(data, 0x1005, wanted) == [ptr]  # at 0x1008
