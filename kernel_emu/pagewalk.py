"""Walk amd64 4-level page tables in guest memory."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kernel_emu.machine import PAGE, Machine

P, W, U, PS = 1, 2, 4, 0x80
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
MAX_LEAVES = 1 << 20


@dataclass(frozen=True)
class Mapping:
    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    executable: bool


def canonical(vaddr: int) -> int:
    return vaddr | 0xFFFF_0000_0000_0000 if vaddr & (1 << 47) else vaddr


_PRESENT_BIT = bytes(b & P for b in range(256))


def _entries(m: Machine, table: int) -> tuple[int, ...]:
    return struct.unpack("<512Q", m.read(table & ADDR_MASK, PAGE))


def _present(m: Machine, table: int) -> list[tuple[int, int]]:
    """(index, entry) of the present entries, found without a Python loop over all 512."""
    raw = m.read(table & ADDR_MASK, PAGE)
    flags = raw[0::8].translate(_PRESENT_BIT)
    out = []
    i = flags.find(1)
    while i >= 0:
        out.append((i, struct.unpack_from("<Q", raw, i * 8)[0]))
        i = flags.find(1, i + 1)
    return out


def walk(m: Machine, cr3: int) -> list[Mapping]:
    """Every present leaf, with permissions combined over the levels (U and W need all levels,
    NX on any level forbids execution)."""
    out: list[Mapping] = []

    def rec(table: int, level: int, base: int, user: bool, writable: bool, nx: bool) -> None:
        shift = 12 + 9 * (level - 1)
        for i, e in _present(m, table):
            if len(out) >= MAX_LEAVES:
                return
            vaddr = base | (i << shift)
            u, w, x = user and bool(e & U), writable and bool(e & W), nx or bool(e & NX)
            if level == 1 or (level in (2, 3) and e & PS):
                size = 1 << shift
                paddr = e & ADDR_MASK & ~(size - 1)
                out.append(Mapping(canonical(vaddr), paddr, size, w, u, not x))
            else:
                rec(e & ADDR_MASK, level - 1, vaddr, u, w, x)

    rec(cr3, 4, 0, True, True, False)
    return out


def translate(m: Machine, cr3: int, vaddr: int) -> Mapping | None:
    """The leaf mapping vaddr, or None when a level is not present."""
    table, user, writable, nx = cr3, True, True, False
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        e = _entries(m, table)[(vaddr >> shift) & 0x1FF]
        if not e & P:
            return None
        user, writable, nx = user and bool(e & U), writable and bool(e & W), nx or bool(e & NX)
        if level == 1 or (level in (2, 3) and e & PS):
            size = 1 << shift
            return Mapping(vaddr & ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF,
                           e & ADDR_MASK & ~(size - 1), size, writable, user, not nx)
        table = e & ADDR_MASK
    return None
