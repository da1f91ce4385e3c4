"""Zero pages left to the host: a zero fill leaves alone the whole pages known to hold zeros
already, and the restore gives them back instead of clearing them (kernel_emu/native/bulk.h,
pagemap.h, walk.c). The memory, and so every Result, is the same as with every page written:
compared here byte for byte with the guest doing its own fills."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel_emu import dirtypages, snapshot
from kernel_emu.executor import Executor
from kernel_emu.machine import PAGE
from kernel_emu.profile import load_profile
from tests.elfs import build_elf
from tests.kernel_emu.speedups import observe
from tests.kernel_emu.test_dirtylog import _differences
from tests.reproducers import REPRODUCERS

walk = snapshot.native_walker
pytestmark = pytest.mark.skipif(walk is None, reason="the native walker is not built")

PRESENT, EXCLUSIVE = 1 << 63, 1 << 56


def _entries(buffer: mmap.mmap, first: int = 0, count: int | None = None) -> list[int]:
    """The host's pagemap entries of `count` pages of `buffer` from page `first` (all)."""
    count = len(buffer) // PAGE - first if count is None else count
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) + first * PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        raw = f.read(count * 8)
    return [entry for (entry,) in struct.iter_unpack("<Q", raw)]


def _pagemap(buffer: mmap.mmap, page: int) -> int:
    """The host's pagemap entry of page `page` of `buffer`."""
    return _entries(buffer, page, 1)[0]


@pytest.fixture
def private() -> Iterator[mmap.mmap]:
    buffer = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    yield buffer
    buffer.close()


def test_the_restore_gives_back_what_need_not_be_written(private: mmap.mmap) -> None:
    data = bytes(range(256)) * 16
    saved: list[bytes | None] = [None] * 8
    assert private[1 * PAGE] == 0  # page 1 read: the host maps its zero page there
    private[2 * PAGE:3 * PAGE] = bytes(PAGE)  # written, but zeros
    private[3 * PAGE:4 * PAGE] = data  # this process's own data
    private[4 * PAGE:5 * PAGE] = data
    saved[4] = data[::-1]  # the snapshot has other bytes there
    private[5 * PAGE:6 * PAGE] = data  # due zeros, not named to give back
    private[6 * PAGE:7 * PAGE] = data  # named to give back, but not written by the run
    assert not _pagemap(private, 0) & PRESENT
    assert _pagemap(private, 1) & PRESENT and not _pagemap(private, 1) & EXCLUSIVE
    written = bytes([0b0011_1111])
    give_back = bytes([0b0101_1111])
    walk.restore_pages(private, saved, written, give_back)
    entries = [_pagemap(private, p) for p in range(6)]  # before reading maps pages in
    assert bytes(private[:4 * PAGE]) == bytes(4 * PAGE)
    assert bytes(private[4 * PAGE:5 * PAGE]) == data[::-1]
    assert bytes(private[5 * PAGE:6 * PAGE]) == bytes(PAGE)
    assert bytes(private[6 * PAGE:7 * PAGE]) == data  # not the restore's to touch
    assert not entries[0] & PRESENT  # absent: left absent
    assert entries[1] & PRESENT and not entries[1] & EXCLUSIVE  # the zero page: kept
    assert not entries[2] & PRESENT  # zeros of its own: given back
    assert entries[3] & EXCLUSIVE  # data: written over, kept for the next run's writes
    assert entries[5] & EXCLUSIVE  # not named: written over


def _fork_scenario() -> None:
    """The fork tests' body, run in an interpreter of its own (a fork makes every later
    restore of the process read the pages it shares, and the tests after these must see
    the process that never forked)."""
    private = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    private[0:PAGE] = b"\x5a" * PAGE
    private[3 * PAGE:4 * PAGE] = b"\xa5" * PAGE
    walk.restore_pages(private, [None] * 8, b"\x02", b"\x02")  # the parent reads its pagemap
    reader, writer = os.pipe()
    done_reader, done_writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe
        ok = False
        try:
            shared = _pagemap(private, 0)
            private[2 * PAGE:3 * PAGE] = bytes(PAGE)
            own = _pagemap(private, 2)
            walk.restore_pages(private, [None] * 8, b"\x05", b"\x05")
            given_back = not _pagemap(private, 0) & PRESENT and \
                not _pagemap(private, 2) & PRESENT
            ok = bool(shared & PRESENT and not shared & EXCLUSIVE and own & EXCLUSIVE and
                      given_back and bytes(private[0:PAGE]) == bytes(PAGE))
        finally:
            os.write(writer, b"1" if ok else b"0")
            os.read(done_reader, 1)  # page 3 stays shared until the parent is done with it
            os._exit(0)
    os.close(writer)
    answer = os.read(reader, 1)
    # the parent too: its page 3, shared with the child, is not the host's zero page
    parents = _pagemap(private, 3)
    walk.restore_pages(private, [None] * 8, b"\x08", b"\x08")
    os.write(done_writer, b"1")
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert bytes(private[0:PAGE]) == b"\x5a" * PAGE  # the parent's page is its own
    assert parents & PRESENT and not parents & EXCLUSIVE
    assert bytes(private[3 * PAGE:4 * PAGE]) == bytes(PAGE)


def test_a_forked_process_reads_the_pages_it_shares() -> None:
    """In a forked child the parent's pages are shared, not the child's own: read from its
    own pagemap, they are given back, and read as zeros. So is a page of zeros the child
    wrote itself, which the parent's pagemap (read before the fork) has as absent. And in
    the parent, a page of data it now shares with the child is written over, not taken for
    the host's zero page."""
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c",
         "from tests.kernel_emu.test_zero_pages import _fork_scenario; _fork_scenario()"],
        cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_both_native_modules_watch_for_forks_before_the_first_bank_exists() -> None:
    """Each module reads the pagemap with its own fork handler: both are loaded with the
    banks' module, so no bank can be shared by a fork that one of them missed."""
    code = ("import sys, kernel_emu.machine; "
            "sys.exit(0 if {'kernel_emu._walk', 'kernel_emu._tracer'} <= set(sys.modules) "
            "else 1)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory, base_elf: bytes) -> dict[str, bytes]:
    """Inputs that zero megabytes: a segment of 4 MiB of BSS, and RX-01's heap filling."""
    bss = build_elf(tmp_path_factory.mktemp("bss"), loads=1, bss=4 << 20).read_bytes()
    rx01 = next(r for r in REPRODUCERS if r.bug == "RX-01").make(base_elf)
    return {"bss": bss, "RX-01": rx01}


@pytest.fixture(scope="module")
def guest_fills() -> Executor:
    """The reference: the guest runs its memset and memcpy itself, every page written."""
    return Executor(load_profile("seed"), fast_routines=False)


def _ram(ex: Executor) -> list[bytes]:
    return [bytes(bank.buffer) for bank in ex.machine.banks]


@pytest.mark.parametrize("trusted", [True, False], ids=["dirty-bits", "pagemap"])
@pytest.mark.parametrize("name", ["bss", "RX-01"])
def test_zero_fills_leave_zero_pages_alone_with_the_same_memory(
        heavy: dict[str, bytes], guest_fills: Executor, name: str, trusted: bool) -> None:
    """Left alone on the identity tables' Dirty bits, or (not trusted) on the host's
    pagemap: twice in a row (the second run finds the pages given back), every byte of RAM
    after the run, and every Result, as with the guest writing each page."""
    ex = Executor(load_profile("seed"))
    if not trusted:
        ex.tracer.trust_zeros(None)
    data = heavy[name]
    reference = observe(guest_fills, data)
    expected = _ram(guest_fills)
    for _ in range(2):
        assert observe(ex, data) == reference
        assert ex.tracer.pages_left_absent > 1000
        assert (ex.tracer.zeros_taken > 1000) == trusted
        assert _ram(ex) == expected
    assert ex.runs_again == 0
    ex.restore()
    assert _differences(ex) == []


def test_a_run_the_log_cannot_vouch_for_is_made_again(monkeypatch: pytest.MonkeyPatch,
                                                      heavy: dict[str, bytes],
                                                      guest_fills: Executor) -> None:
    """A run whose fills took the Dirty bits' word, where the log then cannot vouch for
    those bits (here: it counts two paging instructions), is made again with every fill
    writing its pages, and restored whole."""
    ex = Executor(load_profile("seed"))
    data = heavy["bss"]
    reference = observe(guest_fills, data)
    assert observe(ex, data) == reference
    take_events = dirtypages.WrittenPages.take_events
    spoiled: list[bool] = []

    def spoil(self: dirtypages.WrittenPages) -> list:
        events = take_events(self)
        if not spoiled:
            spoiled.append(True)
            self.paging_writes += 2
        return events

    monkeypatch.setattr(dirtypages.WrittenPages, "take_events", spoil)
    assert observe(ex, data) == reference
    assert ex.runs_again == 1
    assert ex.tracer.zeros_taken == 0  # the second run did not trust the bits
    monkeypatch.undo()
    assert observe(ex, data) == reference
    assert ex.tracer.zeros_taken > 0 and ex.runs_again == 1
    ex.restore()
    assert _differences(ex) == []


def test_every_identity_page_is_mapped_at_itself() -> None:
    ex = Executor(load_profile("seed"))
    log = ex.written.log
    assert log is not None and log.maps_each_page_at_itself()
    table = ex.firmware.pml4
    for _ in range(3):  # down to a page table, where an entry may point elsewhere
        table = ex.machine.u64(table) & 0x000F_FFFF_FFFF_F000
    entry = ex.machine.u64(table + 8)
    ex.machine.put_u64(table + 8, entry + PAGE)
    assert not log.maps_each_page_at_itself()
    ex.machine.put_u64(table + 8, entry)


def _held(buffer: mmap.mmap) -> int:
    """How many pages of `buffer` the host holds for this process alone (not its zero page)."""
    return sum(1 for entry in _entries(buffer) if entry & EXCLUSIVE)


def test_the_pages_a_run_zeroed_are_not_held_after_the_restore(heavy: dict[str, bytes]) -> None:
    ex = Executor(load_profile("seed"))
    assert all(bank.absent_zero for bank in ex.machine.banks)
    low = ex.machine.banks[0].buffer
    ex.run(heavy["bss"])
    ex.restore()
    before = _held(low)
    ex.run(heavy["bss"])
    during = _held(low)
    ex.restore()
    after = _held(low)
    # the 4 MiB of BSS: zeros the host never holds, in the run or after it
    assert after <= before + 16 and during <= before + 64
    assert before < len(low) // PAGE - 1024


def _call_guest(ex: Executor, routine: str, *args: int) -> None:
    """Have the guest call its own `routine` (memset or memcpy) with `args` (the UEFI
    target's calling convention: rcx, rdx, r8), stopping as it returns."""
    m = ex.machine
    back = ex.image.symbol("memcpy" if routine == "memset" else "memset").address  # not reached
    rsp = (m.reg("rsp") - 256) & ~0xF
    m.put_u64(rsp, back)
    m.set_reg("rsp", rsp)
    m.set_reg("rip", ex.image.symbol(routine).address)
    for name, v in zip(("rcx", "rdx", "r8"), args, strict=True):
        m.set_reg(name, v)
    assert ex._emulate(until=back) == "until"


def _call_memset(ex: Executor, address: int, value: int, size: int) -> None:
    _call_guest(ex, "memset", address, value, size)


@pytest.mark.parametrize("pages", [2, 32], ids=["dirty-bits", "pagemap"])
def test_a_page_written_in_the_run_is_zeroed_by_the_fill(pages: int) -> None:
    """A page the snapshot has as zeros, written earlier in the same run: neither the
    Dirty bits (set by that write) nor the host (which now holds the page) let the fill
    leave it alone."""
    ex = Executor(load_profile("seed"), count_blocks=False)  # a run to another address
    if pages > 16:  # a fill long enough to ask the host, which the Dirty bits do not answer
        ex.tracer.trust_zeros(None)
    ex.restore()
    bank = ex.machine.banks[0]
    zero = ex._guest_zero_pages(ex.snapshot) if ex.snapshot else b""
    first = next(i for i in range(bank.size // PAGE // 2, bank.size // PAGE)
                 if all(zero[j // 8] >> j % 8 & 1 for j in range(i, i + pages)))
    address = bank.base + first * PAGE
    _call_memset(ex, address, 0x55, pages * PAGE)
    assert ex.machine.read(address, pages * PAGE) == b"\x55" * pages * PAGE
    _call_memset(ex, address, 0, pages * PAGE)
    assert ex.machine.read(address, pages * PAGE) == bytes(pages * PAGE)
    assert ex.tracer.fast_units >= 2 * pages * PAGE // 8 - 64  # both fills fast-forwarded
    assert ex.tracer.zeros_taken == 0 and ex.tracer.pages_left_absent == 0


def _copy_ends(ex: Executor, pages: int,
               usable: Callable[[int], bool] = lambda _i: True) -> tuple[int, int]:
    """A copy's destination and source in the upper half of the first bank: two runs of
    `pages` pages, one after the other, that the snapshot has as zeros and `usable` takes."""
    bank = ex.machine.banks[0]
    zero = ex._guest_zero_pages(ex.snapshot) if ex.snapshot else b""
    runs = [i for i in range(bank.size // PAGE // 2, bank.size // PAGE - pages)
            if all(zero[j // 8] >> j % 8 & 1 and usable(j) for j in range(i, i + pages))]
    return runs[0], next(i for i in runs if i >= runs[0] + pages)


def test_a_copy_of_zeros_leaves_pages_the_host_does_not_hold_alone() -> None:
    """A long copy writes only the destination pages that would change: a page the host holds
    none of, whose source reads as zeros, is left alone (and given back by the restore); a
    page with data in its source, or one the host holds, is written."""
    pages = 40
    ex = Executor(load_profile("seed"), count_blocks=False)  # a run to another address
    ex.restore()
    bank, m = ex.machine.banks[0], ex.machine
    # zeros the host holds none of, or only as its zero page
    entries = _entries(bank.buffer)
    to, source = _copy_ends(ex, pages, lambda i: not entries[i] & EXCLUSIVE)
    _call_memset(ex, bank.base + (source + 3) * PAGE + 100, 0x44, 4)  # a source page's bytes
    _call_memset(ex, bank.base + (to + 7) * PAGE, 0x55, PAGE)  # one destination page held
    _call_guest(ex, "memcpy", bank.base + to * PAGE, bank.base + source * PAGE, pages * PAGE)
    want = bytearray(pages * PAGE)
    want[3 * PAGE + 100:3 * PAGE + 104] = b"DDDD"
    assert m.read(bank.base + to * PAGE, pages * PAGE) == bytes(want)
    held = [i for i in range(to, to + pages) if _pagemap(bank.buffer, i) & EXCLUSIVE]
    assert to + 3 in held and to + 7 in held
    assert ex.tracer.copies_left_absent >= pages - 4 - len(held)
    assert ex.tracer.copies_left_absent > pages // 2
    ex.restore()
    assert _differences(ex) == []
    # the pages left alone are noted as a fill notes them: the restore does not write them
    assert all(not _pagemap(bank.buffer, i) & EXCLUSIVE
               for i in range(to, to + pages) if i not in held)


def test_a_short_copy_of_zeros_leaves_pages_that_read_as_zeros_alone() -> None:
    """A copy too short to ask the host reads its destination instead: a page that reads as
    zeros, whose source does too, is left alone whether the host holds it or not (a fill
    wrote it, say), and noted, so that the restore gives it back; a page with data on either
    side is written."""
    pages = 6
    ex = Executor(load_profile("seed"), count_blocks=False)  # a run to another address
    ex.restore()
    bank, m = ex.machine.banks[0], ex.machine
    to, source = _copy_ends(ex, pages)
    _call_memset(ex, bank.base + (source + 2) * PAGE + 100, 0x44, 4)  # a source page's bytes
    _call_memset(ex, bank.base + (to + 4) * PAGE, 0x55, PAGE)  # a destination page's data
    _call_memset(ex, bank.base + (to + 1) * PAGE, 0x66, PAGE)  # held by the host, then
    _call_memset(ex, bank.base + (to + 1) * PAGE, 0, PAGE)  # zeros again
    assert _pagemap(bank.buffer, to + 1) & EXCLUSIVE
    _call_guest(ex, "memcpy", bank.base + to * PAGE, bank.base + source * PAGE, pages * PAGE)
    want = bytearray(pages * PAGE)
    want[2 * PAGE + 100:2 * PAGE + 104] = b"DDDD"
    assert m.read(bank.base + to * PAGE, pages * PAGE) == bytes(want)
    assert ex.tracer.copies_left_absent == pages - 2  # all but the two with data
    ex.restore()
    assert _differences(ex) == []
    assert all(not _pagemap(bank.buffer, i) & EXCLUSIVE
               for i in range(to, to + pages) if i not in (to + 2, to + 4))


def test_a_boot_service_after_the_snapshot_ends_the_trust(heavy: dict[str, bytes],
                                                          guest_fills: Executor) -> None:
    """The firmware writes guest memory without Dirty bits, and no restore sees it: once a
    run has a boot service performed, fills stop taking the identity tables' word."""
    ex = Executor(load_profile("seed"))
    observe(ex, heavy["bss"])
    assert ex.tracer.zeros_taken > 0
    ex._served()  # as run_guest reports a service performed
    reference = observe(guest_fills, heavy["bss"])
    assert observe(ex, heavy["bss"]) == reference
    assert ex.tracer.zeros_taken == 0 and ex.tracer.pages_left_absent > 1000
    assert _ram(ex) == _ram(guest_fills)
