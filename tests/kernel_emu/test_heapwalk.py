"""The heap walk on headers written by hand, as each profile describes them."""

from __future__ import annotations

import dataclasses
import random
import struct

from kernel_emu import heapwalk
from kernel_emu.heapwalk import walk_heap
from kernel_emu.machine import Machine
from kernel_emu.profile import load_profile

SEED = load_profile("seed").heap
UPSTREAM = load_profile("upstream").heap


def _machine() -> Machine:
    return Machine([(0, SEED.base + SEED.size)])


def _header(m: Machine, addr: int, size: int, free: bool, prev: int, nxt: int,
            magic: int) -> None:
    m.write(addr, struct.pack("<QB7xQQQ", size, free, magic, prev, nxt))


def _seed_heap(m: Machine, order: tuple[int, int]) -> tuple[int, int]:
    """Three blocks: free, used, free (the rest of the heap); the free list in `order`."""
    a, b = SEED.base, SEED.base + 40 + 0x100
    c = b + 40 + 0x100
    blocks = {a: 0x100, c: SEED.end - c - 40}
    first, second = (a, c) if order == (0, 1) else (c, a)
    _header(m, first, blocks[first], True, 0, second, SEED.magic)
    _header(m, second, blocks[second], True, first, 0, SEED.magic)
    _header(m, b, 0x100, False, 0, 0, SEED.magic)
    return first, second


def test_an_address_ordered_list_out_of_order_is_damage() -> None:
    m = _machine()
    head, _ = _seed_heap(m, (0, 1))
    assert walk_heap(m, SEED, head).problems == []
    head, second = _seed_heap(m, (1, 0))
    problems = walk_heap(m, SEED, head).problems
    assert problems and problems[0][0] == "free_list" and f"{second:#x}" in problems[0][1]
    # the same heap, for an allocator that keeps no order: fine
    lifo = dataclasses.replace(SEED, list_order="lifo")
    assert walk_heap(m, lifo, head).problems == []


def test_a_header_written_over_is_located() -> None:
    m = _machine()
    head, _ = _seed_heap(m, (0, 1))
    used = SEED.base + 40 + 0x100
    m.write(used + SEED.magic_offset, b"AAAAAAAA")
    state = walk_heap(m, SEED, head)
    assert state.problems[0][0] == "block.magic"
    assert state.damaged == (used + SEED.magic_offset, 8)


def test_blocks_that_do_not_tile_walk_only_the_free_list() -> None:
    m = _machine()
    base = UPSTREAM.base
    # the first block still claims the whole heap, size header included; one free block on
    # the list, inside it
    m.write(base, struct.pack("<QB7xQQQ", UPSTREAM.size, False, UPSTREAM.magic, 0, 0))
    rest = base + 0x130
    m.write(rest, struct.pack("<QB7xQQQ", UPSTREAM.size - 0x130, True, UPSTREAM.magic, 0, 0))
    state = walk_heap(m, UPSTREAM, rest)
    assert state.problems == [] and [b.addr for b in state.blocks] == [rest]
    # a list that points back at itself
    m.write(rest + UPSTREAM.next_offset, struct.pack("<Q", rest))
    assert walk_heap(m, UPSTREAM, rest).problems[0] == ("free_list",
                                                        f"free list loops back to {rest:#x}")


def test_a_header_reads_the_same_whatever_its_layout() -> None:
    """Each header field where the layout puts it, in any order or overlapping: the
    one-unpack read of a header agrees with reading its fields one by one."""
    heap = load_profile("seed").heap
    rng = random.Random(1)
    for trial in range(300):
        offsets = (rng.sample(range(64), 5) if trial % 2
                   else [o * 8 for o in rng.sample(range(8), 5)])
        layout = dataclasses.replace(heap, size_offset=offsets[0], free_offset=offsets[1],
                                     magic_offset=offsets[2], prev_offset=offsets[3],
                                     next_offset=offsets[4], header_size=80)
        buf = bytearray(rng.randbytes(200))
        if trial % 3 == 0:
            struct.pack_into("<Q", buf, 7 + layout.magic_offset, layout.magic)

        def u64(offset: int, buf: bytearray = buf) -> int:
            return int(struct.unpack_from("<Q", buf, 7 + offset)[0])

        want = heapwalk.Block(0x1234, u64(layout.size_offset), buf[7 + layout.free_offset] != 0,
                              u64(layout.magic_offset) == layout.magic,
                              u64(layout.prev_offset), u64(layout.next_offset))
        assert heapwalk._read_block(memoryview(buf), 7, 0x1234, layout) == want, offsets
