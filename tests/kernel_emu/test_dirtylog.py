"""The Dirty-bit log of snapshot runs: complete restores, native walk, and its refusals."""

from __future__ import annotations

import random

import pytest

from kernel_emu import dirtylog, dirtypages, snapshot
from kernel_emu.dirtylog import D, dirty_leaves_python, paging_sites, to_bits
from kernel_emu.executor import Executor
from kernel_emu.machine import PAGE
from kernel_emu.profile import load_profile
from kernel_emu.snapshot import ZERO_PAGE
from tests.reproducers import REPRODUCERS


@pytest.fixture(scope="module")
def seed() -> Executor:
    ex = Executor(load_profile("seed"))
    assert ex.use_snapshot and ex.written.log is not None
    return ex


def _inputs(base_elf: bytes) -> list[bytes]:
    rng = random.Random(7)
    garbled = []
    for _ in range(6):
        data = bytearray(base_elf)
        for _ in range(8):
            data[rng.randrange(len(data))] = rng.randrange(256)
        garbled.append(bytes(data))
    return [base_elf, b"", b"junk", *(r.make(base_elf) for r in REPRODUCERS), *garbled]


def _differences(ex: Executor) -> list[tuple[int, int]]:
    """(bank, page) whose bytes differ from the snapshot, outside what the host rewrites per
    input (the ramdisk and its descriptor)."""
    snap = ex.snapshot
    assert snap is not None
    host = ex.firmware.ramdisk_ranges
    out = []
    for r, bank in enumerate(ex.machine.banks):
        for p in range(bank.size // PAGE):
            addr = bank.base + p * PAGE
            actual = bytearray(bank.buffer[p * PAGE:(p + 1) * PAGE])
            expected = bytearray(snap.pages[r][p] or ZERO_PAGE)
            for lo, hi in host:
                lo, hi = max(lo, addr), min(hi, addr + PAGE)
                if lo < hi:
                    actual[lo - addr:hi - addr] = expected[lo - addr:hi - addr]
            if actual != expected:
                out.append((r, p))
    return out


def test_restore_brings_back_every_byte(seed: Executor, base_elf: bytes) -> None:
    """After any run, crashing or not, the restore leaves RAM exactly as in the snapshot,
    page tables included (the CPU sets their Accessed and Dirty bits behind every hook)."""
    verdicts = set()
    for data in _inputs(base_elf):
        verdicts.add(seed.run(data).verdict)
        seed.restore()
        assert _differences(seed) == [], data[:16]
    assert {"ok", "crash", "rejected"} <= verdicts


def test_snapshot_runs_need_no_full_restore(seed: Executor, base_elf: bytes) -> None:
    for data in _inputs(base_elf):
        seed.run(data)
        assert seed.written.since_snapshot() is not None, data[:16]
        seed.restore()


def test_native_dirty_walk_matches_the_python_walk(seed: Executor, base_elf: bytes) -> None:
    assert dirtylog.native_walker is not None, "the native walker is not built"
    forbidding = 0
    for data in _inputs(base_elf):
        seed.run(data)
        pml4 = seed.firmware.pml4
        for root, level in ((pml4, 2), (pml4, 0), (seed.machine.reg("cr3"), 0)):
            native = dirtylog.dirty_leaves(seed.machine, root, level)
            python = dirty_leaves_python(seed.machine, root, level)
            assert native is not None and python is not None
            assert (native.pages, native.tables, native.executable) == \
                (python.pages, python.tables, python.executable)
            assert dirtylog.dirty_count(seed.machine, root, level) == len(python.pages)
            masks = dirtylog.dirty_masks(seed.machine, root, level)
            assert masks is not None
            assert masks.pages == dirtylog.page_mask(seed.machine, python.pages)
            assert masks.tables == dirtylog.page_mask(seed.machine, python.tables)
            assert masks.executable == python.executable
            low = seed.machine.banks[0]
            assert [low.base + i * PAGE for i in dirtylog.mask_indexes(masks.pages)] == \
                sorted(python.pages)
            # the union in one walk: None as soon as a page (not a table) is forbidden
            count = low.size // PAGE
            union = dirtylog.bits_or(masks.page_bits, masks.table_bits)
            tables_only = [t for t in python.tables if t not in python.pages]
            clean = next(low.base + i * PAGE for i in range(count)
                         if low.base + i * PAGE not in python.pages)
            cases = [(0, union), (dirtylog.page_mask(seed.machine, [clean]), union),
                     (dirtylog.page_mask(seed.machine, tables_only), union)]
            if python.pages:
                cases.append((dirtylog.page_mask(seed.machine, python.pages[-1:]), None))
                forbidding += 1
            for forbidden, want in cases:
                assert forbidden is not None
                assert dirtylog.dirty_union(seed.machine, root, level,
                                            to_bits(forbidden, count)) == want
        seed.restore()
    assert forbidding > 0



def test_the_count_gives_up_past_its_cap(seed: Executor, base_elf: bytes) -> None:
    """The count's cap on pages holds as the lists' does: exactly the cap still counts, one
    page more gives up (None), whatever table the pages past it lie in."""
    walker = dirtylog.native_walker
    assert walker is not None, "the native walker is not built"
    low = seed.machine.banks[0]
    seed.run(base_elf)
    pml4 = seed.firmware.pml4
    python = dirty_leaves_python(seed.machine, pml4, 0)
    assert python is not None and len(python.pages) > 2
    n = len(python.pages)
    for cap, want in ((n, n), (n + 5, n), (n - 1, None), (0, None)):
        assert walker.dirty_leaves(low.buffer, low.base, pml4, 0, cap, dirtylog.MAX_TABLES,
                                   dirtylog._COUNT) == want
        lists = walker.dirty_leaves(low.buffer, low.base, pml4, 0, cap, dirtylog.MAX_TABLES)
        assert (lists is None) == (want is None)
    seed.restore()

def _set_dirty(ex: Executor, addr: int) -> None:
    """Mark `addr`'s identity leaf Dirty, as a guest write to it would."""
    for pte_table in range(ex.firmware.pml4, ex.firmware.page_table_end, PAGE):
        for i in range(512):
            e = ex.machine.u64(pte_table + 8 * i)
            if e & 1 and e & dirtylog.ADDR_MASK == addr and pte_table != ex.firmware.pml4:
                leaf = e & 0x80 == 0
                if leaf:
                    ex.machine.put_u64(pte_table + 8 * i, e | D)
                    return
    raise AssertionError(f"no leaf for {addr:#x}")


@pytest.mark.parametrize("what", ["page-table", "code", "two-paging-writes", "dropped-event"])
def test_untrustworthy_runs_restore_everything(monkeypatch: pytest.MonkeyPatch, base_elf: bytes,
                                               what: str) -> None:
    ex = Executor(load_profile("seed"))
    # the run's fills write every page: the executor itself then asks nothing of the log
    # after the run, which is left to this test once the run's record is tampered with
    ex.tracer.trust_zeros(None)
    assert ex.run(base_elf).verdict == "ok"
    assert ex.tracer.zeros_taken == 0
    if what == "page-table":
        _set_dirty(ex, ex.firmware.pml4)
    elif what == "code":
        _set_dirty(ex, ex.firmware.executable_ranges[0][0])
    elif what == "two-paging-writes":
        ex.written.paging_writes += 1
    else:  # the lost event may have been the paging site's
        monkeypatch.setattr(type(ex.tracer), "events_dropped", property(lambda _: 1))
    assert ex.written.since_snapshot() is None
    monkeypatch.undo()
    ex.restore(None)
    assert _differences(ex) == []
    assert ex.run(base_elf).verdict == "ok"


def test_paging_sites_cover_every_possible_start() -> None:
    code = bytes.fromhex("90 41 0f 22 d8 0b 0f 22 da 90 66 f3 0f 30 0f 01")
    assert paging_sites(code, 0x1000) == [0x1001, 0x1002, 0x1006, 0x100A, 0x100B, 0x100C]
    assert paging_sites(bytes(64), 0) == []
    # at most 14 prefixes: an instruction is 15 bytes at most
    assert paging_sites(b"\x66" * 20 + b"\x0f\x22\xd8", 0) == list(range(6, 21))


def test_kernel_paging_sites_are_watched(seed: Executor) -> None:
    enter = seed.image.symbol("rustux_enter_user").address
    # `mov cr3, rdx`, the switch to ring 3's tables; and the `mov cr0`s around the one edit of
    # the firmware's tables (the stack's guard page), which runs before the snapshot
    sites = {seed.image.describe(site).split("+")[0] for site in seed.written.paging_sites}
    assert enter in seed.written.paging_sites
    assert sites == {"rustux_enter_user", "rustux::mm::allocate_kernel_stack"}
    assert seed.tracer.native


def test_python_executor_uses_the_same_log(base_elf: bytes) -> None:
    slow = Executor(load_profile("seed"), native=False)
    assert slow.written.log is not None and not slow.tracer.native
    slow.run(base_elf)
    slow.restore()
    assert _differences(slow) == []


def test_without_the_log_the_write_hook_restores(monkeypatch: pytest.MonkeyPatch,
                                                 base_elf: bytes) -> None:
    """A kernel the log cannot serve (here: pretend its paging sites do not fit in the
    watches) still gets snapshots, restored from the tracer's write hook."""
    monkeypatch.setattr(dirtypages, "page_table_log", lambda *_args: None)
    profile = load_profile("seed")
    hooked, full = Executor(profile), Executor(profile, snapshot=False)
    assert hooked.use_snapshot and hooked.written.log is None
    for data in _inputs(base_elf)[:6] * 2:
        assert hooked.run(data).comparable() == full.run(data).comparable()


def test_restore_without_the_native_walker(monkeypatch: pytest.MonkeyPatch,
                                           base_elf: bytes) -> None:
    """The Python fallbacks of the masks and of the page copies restore the same bytes."""
    ex = Executor(load_profile("seed"))
    monkeypatch.setattr(dirtylog, "native_walker", None)
    monkeypatch.setattr(snapshot, "native_walker", None)
    for data in _inputs(base_elf)[:12]:
        ex.run(data)
        pages = ex.written.since_snapshot()  # consumes what the run left: hand it over
        assert pages is not None and set(pages) == {0}, data[:16]
        ex.restore(pages)
        assert _differences(ex) == [], data[:16]


def test_page_bitmaps_combine_natively_as_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which pages two bitmaps share and all pages of both, natively and in Python, for
    bitmaps of different lengths (the shorter read as zeros past its end)."""
    rng = random.Random(9)
    cases = []
    for _ in range(300):
        # mostly zeros, as the bank's bitmaps are: whole blocks without a common page
        a = bytes(rng.choice((0,) * 30 + (1, 0x80, 0xFF, rng.randrange(256)))
                  for _ in range(rng.randrange(0, 300)))
        b = bytes(rng.choice((0,) * 30 + (2, 0x40, rng.randrange(256)))
                  for _ in range(rng.randrange(0, 300)))
        cases.append((a, b))
    native = [(dirtylog.bits_meet(a, b), dirtylog.bits_or(a, b), dirtylog.bits_and_indexes(a, b))
              for a, b in cases]
    monkeypatch.setattr(dirtylog, "native_walker", None)
    python = [(dirtylog.bits_meet(a, b), dirtylog.bits_or(a, b), dirtylog.bits_and_indexes(a, b))
              for a, b in cases]
    assert native == python
    for (a, b), (meet, either, both) in zip(cases, native, strict=True):
        ia, ib = int.from_bytes(a, "little"), int.from_bytes(b, "little")
        assert meet == bool(ia & ib)
        assert int.from_bytes(either, "little") == ia | ib and len(either) == max(len(a), len(b))
        assert both == dirtylog.mask_indexes(ia & ib)
    assert any(meet for meet, _, _ in native) and not all(meet for meet, _, _ in native)
