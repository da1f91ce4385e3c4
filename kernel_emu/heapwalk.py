"""Walk the kernel heap with the block layout from the target profile."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from kernel_emu.machine import Machine
from kernel_emu.profile import HeapLayout

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
    addr = heap.base
    while addr < heap.end and len(blocks) < max_blocks:
        if addr + hs > heap.end:
            problems.append(("heap.size", f"block at {addr:#x} runs past the heap end "
                                          f"{heap.end:#x}"))
            break
        raw = bank.view[addr - bank.base:addr - bank.base + hs]
        size = struct.unpack_from("<Q", raw, heap.size_offset)[0]
        free = raw[heap.free_offset] != 0
        magic = struct.unpack_from("<Q", raw, heap.magic_offset)[0]
        prev = struct.unpack_from("<Q", raw, heap.prev_offset)[0]
        nxt = struct.unpack_from("<Q", raw, heap.next_offset)[0]
        block = Block(addr, size, free, magic == heap.magic, prev, nxt)
        blocks.append(block)
        if not block.magic_ok:
            problems.append(("block.magic", f"block at {addr:#x}: bad magic {magic:#x} "
                                            f"(expected {heap.magic:#x})"))
            break
        nxt_addr = addr + hs + size
        if nxt_addr > heap.end or size > heap.size:
            problems.append(("block.size", f"block at {addr:#x}: size {size:#x} runs past the "
                                           f"heap end {heap.end:#x}"))
            break
        addr = nxt_addr
    else:
        if addr != heap.end and len(blocks) < max_blocks:
            problems.append(("heap.size", f"blocks end at {addr:#x}, heap ends at {heap.end:#x}"))
    if free_list_head is not None and not problems and len(blocks) < max_blocks:
        problems += _check_free_list(m, heap, blocks, free_list_head)
    return HeapState(blocks, problems)


def _check_free_list(m: Machine, heap: HeapLayout, blocks: list[Block],
                     head: int) -> list[tuple[str, str]]:
    by_addr = {b.addr: b for b in blocks}
    seen: set[int] = set()
    node, prev = head, 0
    while node:
        if node in seen:
            return [("free_list", f"free list loops back to {node:#x}")]
        seen.add(node)
        block = by_addr.get(node)
        if block is None:
            return [("free_list", f"free list node {node:#x} is not a block header")]
        if not block.free:
            return [("free_list", f"free list node {node:#x} is not marked free")]
        if block.prev != prev:
            return [("free_list", f"free list node {node:#x} has prev {block.prev:#x}, "
                                  f"expected {prev:#x}")]
        prev, node = node, block.next
    missing = [b.addr for b in blocks if b.free and b.addr not in seen]
    if missing:
        return [("free_list", f"free block at {missing[0]:#x} is not on the free list")]
    return []
