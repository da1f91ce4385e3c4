"""Walk amd64 4-level page tables in guest memory."""

from __future__ import annotations

import struct
from typing import NamedTuple

from kernel_emu.machine import PAGE, Machine

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the Python walk gives the same answer, slower
    native_walker = None  # type: ignore[assignment]

P, W, U, PS = 1, 2, 4, 0x80
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
MAX_LEAVES = 1 << 20
# per low byte of an entry: 1 when both PRESENT and USER are set
_USER_PRESENT = bytes(int(b & (P | U) == P | U) for b in range(256))


# NamedTuples: built for every input, several times cheaper than frozen dataclasses
class Mapping(NamedTuple):
    """`count` leaves of `size` bytes from `vaddr` with the same rights, consecutive in
    virtual memory; in physical memory each leaf follows the one before, or with
    `descending` precedes it (count > 1 only from ``walk_user(..., runs=True)``)."""

    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    executable: bool
    count: int = 1  # type: ignore[assignment]  # a field, not tuple.count: the run's leaves
    descending: bool = False

    @property
    def end(self) -> int:
        """The first virtual address after the run."""
        return self.vaddr + self.size * self.count

    def leaf(self, k: int) -> Mapping:
        """The k-th leaf of the run."""
        step = k * self.size
        return self._replace(vaddr=self.vaddr + step, count=1, descending=False,
                             paddr=self.paddr - step if self.descending else self.paddr + step)


def canonical(vaddr: int) -> int:
    return vaddr | 0xFFFF_0000_0000_0000 if vaddr & (1 << 47) else vaddr


def _table(m: Machine, table: int) -> bytes:
    # outside RAM a table reads as all ones, like the bus
    return m.read(table & ADDR_MASK, PAGE)


def _entry(m: Machine, table: int, index: int) -> int:
    # the entry's own 8 bytes of the table (which reads as all ones outside RAM)
    return m.u64((table & ADDR_MASK) + index * 8)


def _user_entries(m: Machine, table: int) -> list[tuple[int, int]]:
    """(index, entry) of the entries with PRESENT and USER, without a Python loop over 512."""
    raw = _table(m, table)
    flags = raw[0::8].translate(_USER_PRESENT)
    out = []
    i = flags.find(1)
    while i >= 0:
        out.append((i, struct.unpack_from("<Q", raw, i * 8)[0]))
        i = flags.find(1, i + 1)
    return out


def walk_user(m: Machine, cr3: int, tables: set[int] | None = None, *,
              runs: bool = False) -> list[Mapping]:
    """Every leaf user mode can reach, with permissions combined over the levels (W needs all
    levels, NX on any level forbids execution). Subtrees without USER are skipped: nothing
    under them is user-accessible. The tables visited are added to `tables` when given.
    With `runs`, consecutive 4 KiB leaves come merged (see :func:`coalesce`)."""
    if native_walker is not None:
        low = m.banks[0]
        native = native_walker.user_leaves(low.buffer, low.base, cr3, MAX_LEAVES, runs)
        if native is not None:
            leaves, visited = native
            if tables is not None:
                tables.update(visited)
            return [Mapping(v, p, size, w, True, x, n, d) for v, p, size, w, x, n, d in leaves]
    found = walk_user_python(m, cr3, tables)
    return coalesce(found) if runs else found


def coalesce(leaves: list[Mapping]) -> list[Mapping]:
    """Merge each 4 KiB leaf into the run before it when it follows that run in virtual
    memory with the same rights and its frame is the next one up (or, in a descending run,
    down); larger leaves stay alone."""
    out: list[Mapping] = []
    for leaf in leaves:
        last = out[-1] if out else None
        if (last is not None and leaf.size == PAGE and last.size == PAGE
                and leaf.vaddr == last.end
                and (leaf.writable, leaf.executable) == (last.writable, last.executable)):
            up = leaf.paddr == last.paddr + PAGE * last.count
            down = leaf.paddr == last.paddr - PAGE * last.count
            if (up or down) if last.count == 1 else (down if last.descending else up):
                out[-1] = last._replace(count=last.count + 1, descending=down)
                continue
        out.append(leaf)
    return out


def walk_user_python(m: Machine, cr3: int, tables: set[int] | None = None) -> list[Mapping]:
    """`walk_user` in Python: for tables outside the first RAM bank, and as the reference."""
    out: list[Mapping] = []

    def rec(table: int, level: int, base: int, writable: bool, nx: bool) -> None:
        if tables is not None:
            tables.add(table & ADDR_MASK)
        shift = 12 + 9 * (level - 1)
        for i, e in _user_entries(m, table):
            if len(out) >= MAX_LEAVES:
                return
            vaddr = base | (i << shift)
            w, x = writable and bool(e & W), nx or bool(e & NX)
            if level == 1 or (level in (2, 3) and e & PS):
                size = 1 << shift
                out.append(Mapping(canonical(vaddr), e & ADDR_MASK & ~(size - 1), size, w,
                                   True, not x))
            else:
                rec(e & ADDR_MASK, level - 1, vaddr, w, x)

    rec(cr3, 4, 0, True, False)
    return out


def translate(m: Machine, cr3: int, vaddr: int) -> Mapping | None:
    """The leaf mapping vaddr, or None when a level is not present."""
    table, user, writable, nx = cr3, True, True, False
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        e = _entry(m, table, (vaddr >> shift) & 0x1FF)
        if not e & P:
            return None
        user, writable, nx = user and bool(e & U), writable and bool(e & W), nx or bool(e & NX)
        if level == 1 or (level in (2, 3) and e & PS):
            size = 1 << shift
            return Mapping(vaddr & ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF,
                           e & ADDR_MASK & ~(size - 1), size, writable, user, not nx)
        table = e & ADDR_MASK
    return None
