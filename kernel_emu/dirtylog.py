"""Which RAM pages a snapshot run wrote, read from the Dirty bits of the page tables.

A ``UC_HOOK_MEM_WRITE`` hook would name every written page, but Unicorn 2.1.4 keeps every
store to a hooked page on its slow path, which costs several times the rest of a short run.
The CPU keeps the same record itself: QEMU's x86 page walker grants a TLB entry write access
only once the leaf entry's Dirty bit is set, and sets it on the first write through that
entry.  So :meth:`PageTableLog.arm` clears Dirty in every leaf of the firmware's identity
tables when the snapshot is taken, the restore flushes the TLB before every run, and after
the run the leaves with Dirty set name the written pages (:meth:`PageTableLog.collect`).

Accessed is cleared in the page-directory entries at the same time: the walker sets it in
every entry it passes through, so the scan skips the page tables the run never used (a few
of the ~70).  The walker writes Accessed and Dirty straight to guest memory, so every table
the scan visits is restored too, which also clears the bits again.

The Dirty bits of the identity tables cover the writes made while CR3 holds them.  Only an
instruction that writes a control register (``mov crN``) or an MSR (``wrmsr``, for EFER) can
make the CPU translate otherwise, so the caller watches every address in the executable
pages where one could start (:meth:`PageTableLog.sites`) and passes how many ran.  With none,
the identity tables are the whole story; with one, the tables CR3 holds after the run are
scanned as well (the switch to a user address space the kernel makes right before ring 3).
Whenever the log cannot vouch for the set, :meth:`collect` returns ``None`` and the caller
must restore everything:

* a page of the identity tables was written (its entries may no longer say what was written
  through them), or a page of the final tables was written through those tables;
* an executable page of the identity map was written (the code may no longer be the code
  whose sites are watched);
* more than one watched instruction ran, paging is off, or CR3 changed with none running;
* under the final tables, code may have run from a page other than the identity map's own
  executable pages at their own addresses, where a site would not be watched (seen as a leaf
  with Accessed set that no level marks NX);
* a table lies outside the first RAM bank, or a walk passes its caps.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Literal

from kernel_emu.machine import PAGE, Machine

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the Python walk gives the same answer, slower
    native_walker = None  # type: ignore[assignment]

P, A, D, PS, NX = 1, 0x20, 0x40, 0x80, 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG = 1 << 31
MAX_PAGES = 1 << 16
MAX_TABLES = 1 << 12
# the forms of the native walk's answer
_LISTS: Literal[0] = 0
_BITMAPS: Literal[1] = 1
_COUNT: Literal[2] = 2
_UNION: Literal[3] = 3

# Legacy and REX prefixes: bytes that may come before an opcode in one instruction.
_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3" + bytes(range(0x40, 0x50)))
# mov to a control register; wrmsr, which can rewrite EFER
_PAGING_OPCODES = (b"\x0f\x22", b"\x0f\x30")
_MAX_PREFIXES = 14  # an instruction is at most 15 bytes


class Walk:
    """What one walk of a page-table tree found (see :func:`dirty_leaves`)."""

    __slots__ = ("pages", "tables", "executable")

    def __init__(self, pages: list[int], tables: list[int],
                 executable: list[tuple[int, int, int]]) -> None:
        self.pages = pages
        self.tables = tables
        self.executable = executable


def dirty_leaves(m: Machine, root: int, accessed_level: int = 0) -> Walk | None:
    """Walk every present entry under ``root`` (tables in the first RAM bank): the pages under
    leaves with Dirty set, the tables visited and the executable leaves with Accessed set.
    Non-leaf entries at level ``accessed_level`` (0: none) without Accessed are not descended.
    ``None`` when a table lies outside the bank or the walk passes its caps."""
    if native_walker is not None:
        low = m.banks[0]
        native = native_walker.dirty_leaves(low.buffer, low.base, root, accessed_level,
                                            MAX_PAGES, MAX_TABLES)
        return None if native is None else Walk(*native)
    return dirty_leaves_python(m, root, accessed_level)


class MaskWalk:
    """:class:`Walk` with the pages and the tables as bitmaps over the first RAM bank's pages
    (bit i of byte i // 8, from the lowest: the page at base + i * PAGE); `pages` and
    `tables` give them as integer bit masks."""

    __slots__ = ("page_bits", "table_bits", "executable")

    def __init__(self, page_bits: bytes | bytearray, table_bits: bytes | bytearray,
                 executable: list[tuple[int, int, int]]) -> None:
        self.page_bits = page_bits
        self.table_bits = table_bits
        self.executable = executable

    @property
    def pages(self) -> int:
        return int.from_bytes(self.page_bits, "little")

    @property
    def tables(self) -> int:
        return int.from_bytes(self.table_bits, "little")


# Bitmaps of pages (as MaskWalk's): which pages two share, and all of both. Natively when the
# walker is built: a mask over the bank's 32,768 pages is a 4 KiB int, and turning bitmaps
# into ints and back cost ~5 µs a run.
def bits_meet(a: bytes | bytearray, b: bytes | bytearray) -> bool:
    if native_walker is not None:
        return native_walker.bits_meet(a, b)
    return bool(int.from_bytes(a, "little") & int.from_bytes(b, "little"))


def bits_or(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    if native_walker is not None:
        return native_walker.bits_or(a, b)
    either = int.from_bytes(a, "little") | int.from_bytes(b, "little")
    return either.to_bytes(max(len(a), len(b)), "little")


def bits_and_indexes(a: bytes | bytearray, b: bytes | bytearray) -> list[int]:
    if native_walker is not None:
        return native_walker.bits_and_indexes(a, b)
    return mask_indexes(int.from_bytes(a, "little") & int.from_bytes(b, "little"))


def to_bits(mask: int | bytes | bytearray, count: int) -> bytes | bytearray:
    """A mask over `count` pages as a bitmap (a bitmap as it is)."""
    if isinstance(mask, int):
        return mask.to_bytes((count + 7) // 8, "little")
    return mask


def index_mask(indexes: Iterable[int], count: int) -> int:
    """The bit mask with these bits set, each below `count`."""
    bits = bytearray((count + 7) // 8)
    for index in indexes:
        bits[index >> 3] |= 1 << (index & 7)
    return int.from_bytes(bits, "little")


def page_mask(m: Machine, addresses: Iterable[int]) -> int | None:
    """The bit mask over the first bank's pages of these page addresses; None when one lies
    outside the bank."""
    low = m.banks[0]
    indexes = []
    for addr in addresses:
        if not low.contains(addr, PAGE):
            return None
        indexes.append((addr - low.base) // PAGE)
    return index_mask(indexes, low.size // PAGE)


def mask_indexes(mask: int | bytes | bytearray) -> list[int]:
    """The indexes of the set bits, in order (of an int, or of a bitmap)."""
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little") if isinstance(mask, int) \
        else mask
    return [i * 8 + bit for i, byte in enumerate(data) if byte
            for bit in range(8) if byte >> bit & 1]


def dirty_masks(m: Machine, root: int, accessed_level: int = 0) -> MaskWalk | None:
    """:func:`dirty_leaves` with bit masks; also ``None`` when a dirty page lies outside the
    first RAM bank."""
    if native_walker is not None:
        low = m.banks[0]
        native = native_walker.dirty_leaves(low.buffer, low.base, root, accessed_level,
                                            MAX_PAGES, MAX_TABLES, _BITMAPS)
        if native is None:
            return None
        return MaskWalk(*native)
    walk = dirty_leaves_python(m, root, accessed_level)
    if walk is None:
        return None
    pages, tables = page_mask(m, walk.pages), page_mask(m, walk.tables)
    if pages is None or tables is None:
        return None
    count = m.banks[0].size // PAGE
    return MaskWalk(to_bits(pages, count), to_bits(tables, count), walk.executable)


def dirty_union(m: Machine, root: int, accessed_level: int,
                forbidden: bytes | bytearray) -> bytes | None:
    """The bitmap of :func:`dirty_masks`'s pages and tables together, or ``None`` also when
    one of its pages is `forbidden` (a bitmap of pages); natively in one walk, without the
    list of executable mappings (a restore after every run asks this)."""
    if native_walker is not None:
        low = m.banks[0]
        return native_walker.dirty_leaves(low.buffer, low.base, root, accessed_level,
                                          MAX_PAGES, MAX_TABLES, _UNION, forbidden)
    walk = dirty_masks(m, root, accessed_level)
    if walk is None or bits_meet(walk.page_bits, forbidden):
        return None
    return bits_or(walk.page_bits, walk.table_bits)


def dirty_count(m: Machine, root: int, accessed_level: int = 0) -> int | None:
    """``len(dirty_leaves(...).pages)``, without building the lists when the native walker is
    built (the watchdog asks this at every checkpoint of a run that loads megabytes)."""
    if native_walker is not None:
        low = m.banks[0]
        return native_walker.dirty_leaves(low.buffer, low.base, root, accessed_level,
                                          MAX_PAGES, MAX_TABLES, _COUNT)
    walk = dirty_leaves_python(m, root, accessed_level)
    return None if walk is None else len(walk.pages)


class _GiveUp(Exception):
    pass


def dirty_leaves_python(m: Machine, root: int, accessed_level: int = 0) -> Walk | None:
    """:func:`dirty_leaves` in Python: the reference for the native walk."""
    low = m.banks[0]
    out = Walk([], [], [])

    def rec(table: int, level: int, base: int, nx: bool) -> None:
        table &= ADDR_MASK
        if not low.contains(table, PAGE) or len(out.tables) >= MAX_TABLES:
            raise _GiveUp
        out.tables.append(table)
        shift = 12 + 9 * (level - 1)
        for i, e in enumerate(struct.unpack("<512Q", m.read(table, PAGE))):
            if not e & P:
                continue
            vaddr = base | (i << shift)
            x_off = nx or bool(e & NX)
            if level == 1 or (level in (2, 3) and e & PS):
                size = 1 << shift
                paddr = e & ADDR_MASK & ~(size - 1)
                if e & A and not x_off:
                    canonical = vaddr | 0xFFFF_0000_0000_0000 if vaddr & (1 << 47) else vaddr
                    out.executable.append((canonical, paddr, size))
                if e & D:
                    if MAX_PAGES - len(out.pages) < size // PAGE:
                        raise _GiveUp
                    out.pages.extend(range(paddr, paddr + size, PAGE))
            elif level != accessed_level or e & A:
                rec(e, level - 1, vaddr, x_off)

    try:
        rec(root, 4, 0, False)
    except _GiveUp:
        return None
    return out


def paging_sites(code: bytes, base: int) -> list[int]:
    """Every address in ``code`` (loaded at ``base``) where an instruction that writes a
    control register or an MSR may start: each ``0F 22`` and ``0F 30`` and each start of the
    run of prefix bytes right before it.  Any byte offset counts, not only the instruction
    boundaries of a linear disassembly, because a corrupted jump can land anywhere."""
    sites: set[int] = set()
    for opcode in _PAGING_OPCODES:
        i = code.find(opcode)
        while i >= 0:
            start = i
            while start > 0 and i - start < _MAX_PREFIXES and code[start - 1] in _PREFIXES:
                start -= 1
            sites.update(range(base + start, base + i + 1))
            i = code.find(opcode, i + 1)
    return sorted(sites)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class PageTableLog:
    """Dirty-bit bookkeeping over the identity tables at ``cr3``, whose page-aligned
    ``executable`` ranges are the only code the guest can run while CR3 holds them."""

    def __init__(self, m: Machine, cr3: int, executable: list[tuple[int, int]]) -> None:
        self.m = m
        self.identity = cr3 & ADDR_MASK
        self.executable = _merge(executable)
        # _runs_only_own_code's answers by the executable leaves asked about: nearly every
        # run ends with the same few (the kernel's code, where it was mapped)
        self._own_code: dict[tuple[tuple[int, int, int], ...], bool] = {}
        self._exec_pages = frozenset(page for lo, hi in self.executable
                                     for page in range(lo, hi, PAGE))
        full = dirty_leaves_python(m, self.identity)
        if full is None:
            raise ValueError("the identity page tables are not all in the first RAM bank")
        identity_tables, exec_pages = page_mask(m, full.tables), page_mask(m, self._exec_pages)
        if identity_tables is None or exec_pages is None:
            raise ValueError("the identity page tables or the code are not all in the first "
                             "RAM bank")
        # what no run may write for the log to vouch for its pages
        self._forbidden = to_bits(identity_tables | exec_pages, m.banks[0].size // PAGE)
        self.sites = sorted({site for lo, hi in self.executable
                             for site in paging_sites(m.read(lo, hi - lo), lo)})

    def maps_each_page_at_itself(self) -> bool:
        """Whether every page the identity tables map is mapped at its own address (and so
        at no other): a page's Dirty bit there then speaks for every store to the page made
        through them."""
        m = self.m

        def rec(table: int, level: int, base: int) -> bool:
            entries = struct.unpack("<512Q", m.read(table, PAGE))
            span = 1 << (12 + 9 * (level - 1))
            for i, e in enumerate(entries):
                if not e & P:
                    continue
                va = base + i * span
                if level == 1 or (level in (2, 3) and e & PS):
                    if e & ADDR_MASK & ~(span - 1) != va:
                        return False
                elif not rec(e & ADDR_MASK, level - 1, va):
                    return False
            return True

        return rec(self.identity, 4, 0)

    def arm(self) -> None:
        """Clear Dirty in the leaves and Accessed in the page-directory entries of the
        identity tables; call it once, before the snapshot is taken."""
        m = self.m

        def rec(table: int, level: int) -> None:
            entries = list(struct.unpack("<512Q", m.read(table, PAGE)))
            for i, e in enumerate(entries):
                if not e & P:
                    continue
                if level == 1 or (level in (2, 3) and e & PS):
                    entries[i] = e & ~D
                else:
                    if level == 2:
                        entries[i] = e & ~A
                    rec(e & ADDR_MASK, level - 1)
            m.write(table, struct.pack("<512Q", *entries))

        rec(self.identity, 4)

    def _runs_only_own_code(self, walk: MaskWalk) -> bool:
        key = tuple(walk.executable)
        own = self._own_code.get(key)
        if own is None:
            own = all(vaddr == paddr and all(page in self._exec_pages
                                             for page in range(paddr, paddr + size, PAGE))
                      for vaddr, paddr, size in key)
            if len(self._own_code) >= 256:
                self._own_code.clear()
            self._own_code[key] = own
        return own

    def collect(self, paging_writes: int) -> bytes | None:
        """The physical pages to restore after a run in which ``paging_writes`` watched
        instructions ran, as a bitmap over the first RAM bank's pages (see
        :class:`MaskWalk`), or ``None`` when only a full restore is safe (see the module doc).
        Read it before the next restore; the pages include the tables the walks visited."""
        m = self.m
        if paging_writes > 1:
            return None
        restore = dirty_union(m, self.identity, 2, self._forbidden)
        if restore is None:
            return None
        cr3 = m.reg("cr3") & ADDR_MASK
        if not m.reg("cr0") & CR0_PG or (cr3 != self.identity and not paging_writes):
            return None
        if cr3 != self.identity:
            final = dirty_masks(m, cr3)
            if final is None or not self._runs_only_own_code(final):
                return None
            if bits_meet(final.page_bits, self._forbidden) or \
                    bits_meet(final.page_bits, final.table_bits):
                return None
            restore = bits_or(restore, bits_or(final.page_bits, final.table_bits))
        return restore
