"""The heap walk on headers written by hand, as each profile describes them."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest

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


def _random_heap(rng: random.Random, m: Machine, heap: heapwalk.HeapLayout,
                 sizes: tuple[int, ...] = (0x10, 0x28, 0x100, 0x1000, 0x8000)) -> int:
    """Blocks of `sizes` tiling `heap`, some free and linked into the free list as the layout
    keeps it; then, now and then, a header or list link written over. The list's head."""
    hs, counted = heap.header_size, heap.header_size if heap.size_includes_header else 0
    m.write(heap.base, bytes(heap.size))
    addr, blocks = heap.base, []
    while addr < heap.end:
        size = min(rng.choice(sizes), heap.end - addr - hs)
        if size < 0x10 or rng.random() < 0.02:
            size = heap.end - addr - hs  # the rest of the heap
        blocks.append((addr, size, rng.random() < 0.4))
        addr += hs + size
    free = [a for a, _, f in blocks if f]
    if heap.list_order != "address" or rng.random() < 0.2:  # or out of the order it keeps
        rng.shuffle(free)
    links = {a: free[i + 1] if i + 1 < len(free) else 0 for i, a in enumerate(free)}
    back = {a: free[i - 1] if i else 0 for i, a in enumerate(free)}
    for a, size, f in blocks:
        _header(m, a, size + counted, f, back.get(a, 0), links.get(a, 0), heap.magic)
    wrong = rng.random()
    if wrong < 0.5:  # something written over: a header field, a link, a stray byte
        a, size, _ = rng.choice(blocks)
        at = a + rng.choice((heap.size_offset, heap.free_offset, heap.magic_offset,
                             heap.prev_offset, heap.next_offset, rng.randrange(hs)))
        value = rng.choice((0, 1, 0x28, heap.size, a, rng.choice(blocks)[0],
                            rng.randrange(1 << 64)))
        m.write(at, struct.pack("<Q", value) if rng.random() < 0.8 else bytes([value & 0xFF]))
    head = free[0] if free else 0
    if 0.5 <= wrong < 0.6:
        head = rng.choice([b[0] for b in blocks] + [0, heap.base - 8, (1 << 64) - 8])
    return head


def test_the_native_walk_answers_as_the_python_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the heap holds, walk_heap gives the same blocks, problems and damaged spot
    with the native common case as without it (which it leaves every problem to)."""
    assert heapwalk.native_walker is not None, "the native walker is not built"
    m = _machine()
    rng = random.Random(3)
    small = dataclasses.replace(SEED, size=0x1_0000)  # a few dozen blocks
    layouts = [small, dataclasses.replace(small, list_order="any"),
               dataclasses.replace(small, size_includes_header=True)]
    clean = crowded = 0
    for trial in range(1200):
        heap = layouts[trial % len(layouts)]
        # now and then hundreds of small blocks: more than the walk first makes room for
        head = _random_heap(rng, m, heap, (0x10, 0x28, 0x40)) if trial % 5 == 0 else \
            _random_heap(rng, m, heap)
        heads = [head, None] if trial % 7 == 0 else [head]
        cap = rng.choice((heapwalk.MAX_BLOCKS, heapwalk.MAX_BLOCKS, 3))
        for h in heads:
            got = walk_heap(m, heap, h, cap)
            with monkeypatch.context() as patch:
                patch.setattr(heapwalk, "native_walker", None)
                want = walk_heap(m, heap, h, cap)
            assert got == want, trial
            clean += not want.problems
            crowded += not want.problems and len(want.blocks) > 150
    assert clean > 400  # many heaps with nothing wrong, walked natively
    assert crowded > 5
