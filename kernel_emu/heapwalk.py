"""Walk the kernel heap with the block layout from the target profile."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from kernel_emu.machine import Machine
from kernel_emu.profile import HeapLayout

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the walk below gives the same answer, slower
    native_walker = None  # type: ignore[assignment]

MAX_BLOCKS = 100_000


# NamedTuples: built for every input, several times cheaper than frozen dataclasses
class Block(NamedTuple):
    addr: int
    size: int
    free: bool
    magic_ok: bool
    prev: int
    next: int

    def to_json(self, header: int) -> dict[str, Any]:
        return {"addr": self.addr, "payload": self.addr + header, "size": self.size,
                "free": self.free, "magic_ok": self.magic_ok}


@dataclass
class HeapState:
    blocks: list[Block]
    problems: list[tuple[str, str]]  # (field, evidence)
    # (address, size) of the header field the first problem was read in, when it is one:
    # whoever wrote it last is the likeliest culprit
    damaged: tuple[int, int] | None = None
    # where the first problem was found: the header found damaged, or the free-list node or
    # free block that is wrong
    spot: int | None = None


def walk_heap(m: Machine, heap: HeapLayout, free_list_head: int | None,
              max_blocks: int = MAX_BLOCKS) -> HeapState:
    """Blocks by address from the heap base, then the free list from its head.

    Problems: bad magic, sizes that do not add up to the heap, free-list cycles, free-list
    nodes that are not marked free or lie outside the heap, free blocks missing from the list.
    """
    hs = heap.header_size
    blocks: list[Block] = []
    problems: list[tuple[str, str]] = []
    bank = m.bank_for(heap.base, heap.size)
    if bank is None:
        return HeapState([], [("heap.size", f"heap {heap.base:#x}+{heap.size:#x} is not RAM")])
    if not heap.blocks_tile:
        return _walk_free_list(m, heap, free_list_head, max_blocks)
    # the header's size field, less what it counts beyond the payload
    counted = hs if heap.size_includes_header else 0
    if native_walker is not None:
        # a heap with nothing wrong, walked natively; anything to report is walked below
        fine = native_walker.heap_blocks(
            bank.buffer, bank.base, heap.base, heap.end,
            (hs, counted, heap.size_offset, heap.free_offset, heap.magic_offset,
             heap.prev_offset, heap.next_offset, heap.magic),
            (free_list_head or 0, free_list_head is not None), heap.list_order == "address",
            max_blocks, Block)
        if fine is not None:
            return HeapState(fine, [])
    addr = heap.base
    damaged: tuple[int, int] | None = None
    spot: int | None = None
    while addr < heap.end and len(blocks) < max_blocks:
        if addr + hs > heap.end:
            problems.append(("heap.size", f"block at {addr:#x} runs past the heap end "
                                          f"{heap.end:#x}"))
            if blocks:  # the size that led here
                damaged = (blocks[-1].addr + heap.size_offset, 8)
                spot = blocks[-1].addr
            break
        block = _read_block(bank.view, addr - bank.base, addr, heap)
        blocks.append(block)
        if not block.magic_ok:
            problems.append(("block.magic", _bad_magic(bank.view, addr - bank.base, addr,
                                                       heap)))
            damaged = damaged or (addr + heap.magic_offset, 8)
            spot = addr
            break
        size = block.size
        nxt_addr = addr + hs + size - counted
        if nxt_addr > heap.end or size > heap.size or nxt_addr <= addr:
            damaged = damaged or (addr + heap.size_offset, 8)
            spot = addr
            problems.append(("block.size", f"block at {addr:#x}: size {size:#x} runs past the "
                                           f"heap end {heap.end:#x}"))
            break
        addr = nxt_addr
    else:
        if addr != heap.end and len(blocks) < max_blocks:
            problems.append(("heap.size", f"blocks end at {addr:#x}, heap ends at {heap.end:#x}"))
            if blocks:
                damaged = (blocks[-1].addr + heap.size_offset, 8)
                spot = blocks[-1].addr
    if free_list_head is not None and not problems and len(blocks) < max_blocks:
        wrong = _check_free_list(m, heap, blocks, free_list_head)
        if wrong is not None:
            spot, problem = wrong
            problems.append(problem)
    return HeapState(blocks, problems, damaged if problems else None, spot)


_U64 = struct.Struct("<Q")
# per header layout: one Struct for its size, free byte, magic, prev and next, and where
# each of those five is in what it unpacks (None: fields that overlap, read one by one)
_headers: dict[tuple[int, ...], tuple[struct.Struct, tuple[int, ...]] | None] = {}


def _header_struct(heap: HeapLayout) -> tuple[struct.Struct, tuple[int, ...]] | None:
    key = (heap.size_offset, heap.free_offset, heap.magic_offset, heap.prev_offset,
           heap.next_offset)
    if key not in _headers:
        fields = sorted(zip(key, (8, 1, 8, 8, 8), range(5), strict=True))
        layout: tuple[struct.Struct, tuple[int, ...]] | None = None
        pairs = zip(fields, fields[1:], strict=False)
        if all(a + width <= b for (a, width, _), (b, _, _) in pairs):
            fmt, at = "<", 0
            for offset, width, _ in fields:
                fmt += (f"{offset - at}x" if offset > at else "") + ("Q" if width == 8 else "B")
                at = offset + width
            by_offset = [i for _, _, i in fields]
            layout = struct.Struct(fmt), tuple(by_offset.index(i) for i in range(5))
        _headers[key] = layout
    return _headers[key]


def _read_block(view: Any, at: int, addr: int, heap: HeapLayout) -> Block:
    layout = _header_struct(heap)
    if layout is None:
        u = _U64.unpack_from
        return Block(addr, u(view, at + heap.size_offset)[0], view[at + heap.free_offset] != 0,
                     u(view, at + heap.magic_offset)[0] == heap.magic,
                     u(view, at + heap.prev_offset)[0], u(view, at + heap.next_offset)[0])
    st, p = layout
    got = st.unpack_from(view, at)
    return Block(addr, got[p[0]], got[p[1]] != 0, got[p[2]] == heap.magic, got[p[3]], got[p[4]])


def _bad_magic(view: Any, at: int, addr: int, heap: HeapLayout) -> str:
    magic = struct.unpack_from("<Q", view, at + heap.magic_offset)[0]
    return f"block at {addr:#x}: bad magic {magic:#x} (expected {heap.magic:#x})"


def _walk_free_list(m: Machine, heap: HeapLayout, head: int | None,
                    max_blocks: int) -> HeapState:
    """For allocators whose blocks do not tile the heap: the free list from its head, each
    node a header inside the heap with the right magic, marked free, met once."""
    blocks: list[Block] = []
    if head is None:
        return HeapState(blocks, [])
    bank = m.bank_for(heap.base, heap.size)
    assert bank is not None
    seen: set[int] = set()
    node = head
    while node and len(blocks) < max_blocks:
        if node in seen:
            return HeapState(blocks, [("free_list", f"free list loops back to {node:#x}")],
                             spot=node)
        seen.add(node)
        if node < heap.base or node + heap.header_size > heap.end:
            return HeapState(blocks, [("free_list", f"free list node {node:#x} lies outside "
                                                    f"the heap")], spot=node)
        block = _read_block(bank.view, node - bank.base, node, heap)
        blocks.append(block)
        if not block.magic_ok:
            return HeapState(blocks, [("block.magic", _bad_magic(bank.view, node - bank.base,
                                                                 node, heap))], spot=node)
        if not block.free:
            return HeapState(blocks, [("free_list", f"free list node {node:#x} is not marked "
                                                    f"free")], spot=node)
        node = block.next
    blocks.sort(key=lambda b: b.addr)
    return HeapState(blocks, [])


def _check_free_list(m: Machine, heap: HeapLayout, blocks: list[Block],
                     head: int) -> tuple[int, tuple[str, str]] | None:
    """The first node or free block that is wrong, and what is wrong with it."""
    by_addr = {b.addr: b for b in blocks}
    seen: set[int] = set()
    node, prev = head, 0
    while node:
        if node in seen:
            return node, ("free_list", f"free list loops back to {node:#x}")
        seen.add(node)
        block = by_addr.get(node)
        if block is None:
            return node, ("free_list", f"free list node {node:#x} is not a block header")
        if not block.free:
            return node, ("free_list", f"free list node {node:#x} is not marked free")
        if block.prev != prev:
            return node, ("free_list", f"free list node {node:#x} has prev {block.prev:#x}, "
                                       f"expected {prev:#x}")
        if heap.list_order == "address" and prev and node <= prev:
            return node, ("free_list", f"free list node {node:#x} follows {prev:#x}: the list "
                                       f"is kept in address order")
        prev, node = node, block.next
    missing = [b.addr for b in blocks if b.free and b.addr not in seen]
    if missing:
        return missing[0], ("free_list", f"free block at {missing[0]:#x} is not on the free "
                                         f"list")
    return None
