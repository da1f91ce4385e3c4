"""The leak oracle's word search: every way of looking finds the same words."""

from __future__ import annotations

import random
import struct

import pytest

from kernel_emu import leaks
from kernel_emu.allocations import Allocation
from kernel_emu.leaks import WORDS_AT_ONCE, _held, _held_python, _holds_word

needs_native = pytest.mark.skipif(leaks.held_words is None,
                                  reason="the native walker is not built")


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
        assert _held_python(bytes(data), start, wanted) == found
        for ptr in found:  # really there, 8-aligned in the address space
            at = bytes(data).find(struct.pack("<Q", ptr))
            assert at >= 0


def test_only_aligned_words_count() -> None:
    ptr = 0x30_0028
    wanted = {ptr: Allocation(1, ptr, 8)}
    data = bytes(3) + struct.pack("<Q", ptr) + bytes(5)
    assert _held(data, 0x1000, wanted) == []  # at 0x1003
    assert _held(data, 0x1005, wanted) == [ptr]  # at 0x1008


@needs_native
def test_the_native_scan_finds_what_the_search_finds() -> None:
    """Repeated keys, keys at either end, misaligned starts, zero-filled regions (where a
    search per key is slowest), keys above 2**63."""
    rng = random.Random(11)
    for _ in range(300):
        start = rng.randrange(1 << 20)
        size = rng.choice((0, 7, 8, 16, 4096, 8700))
        data = bytearray(size if rng.random() < 0.3 else 0) or bytearray(rng.randbytes(size))
        keys = [rng.choice((rng.randrange(1 << 64), 0x300000 + 8 * rng.randrange(64), 0))
                for _ in range(rng.randrange(0, 8))]
        keys += keys[:rng.randrange(3)]
        for key in keys[:3]:
            if size >= 8:
                at = rng.choice((0, size - 8, rng.randrange(size - 7)))
                data[at:at + 8] = struct.pack("<Q", key)
        found = leaks.held_words(bytes(data), start, keys)
        assert found == [k for k in keys if _holds_word(bytes(data), start, k)]


@needs_native
def test_the_native_scan_refuses_what_is_no_word() -> None:
    with pytest.raises(OverflowError):
        leaks.held_words(bytes(16), 0, [1 << 64])
    with pytest.raises(TypeError):
        leaks.held_words(bytes(16), 0, 5)
