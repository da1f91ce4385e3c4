"""The native fast path of the guest's memset/memcpy bulk moves, and of its strings written to
the console, changes nothing but speed: every run gives the same Result, instruction count,
watchdog stop, recent blocks, coverage, console and RAM with it as without it (and as the
pure-Python tracer, which never takes it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.harness import WATCHDOG
from fuzz.mutator import ElfMutator
from kernel_emu import dirtypages
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.kernel_emu.speedups import KERNELS, executor_pairs, observe
from tests.kernel_emu.test_dirtylog import _differences
from tests.reproducers import REPRODUCERS, loads, set_phdr

ROOT = Path(__file__).parents[2]
SEEDS = sorted((ROOT / "corpus" / "seeds").glob("*.elf"))
REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.elf"))
MUTATED = 2000


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[Executor, Executor]]:
    """Per kernel: (fast path on, off)."""
    return executor_pairs(fast_routines=False)


def _same(pair: tuple[Executor, Executor], data: bytes) -> int:
    """Assert both executors agree on `data`; the iterations the fast one took over."""
    fast, slow = pair
    assert observe(fast, data) == observe(slow, data)
    assert slow.fast_units == 0
    return fast.fast_units


def _ram(ex: Executor) -> list[bytes]:
    return [bytes(bank.buffer) for bank in ex.machine.banks]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rep", REPRODUCERS, ids=lambda r: r.bug)
def test_bug_reproducers(pairs: dict[str, tuple[Executor, Executor]], base_elf: bytes,
                         kernel: str, rep) -> None:
    data = rep.make(base_elf)
    _same(pairs[kernel], data)
    fast, slow = pairs[kernel]
    assert _ram(fast) == _ram(slow)  # the state the run left, before any restore


def test_the_heap_filling_trigger_is_fast_forwarded(pairs: dict[str, tuple[Executor, Executor]],
                                                    base_elf: bytes) -> None:
    rep = next(r for r in REPRODUCERS if r.bug == "RX-01")
    assert _same(pairs["seed"], rep.make(base_elf)) > 1_000_000


@pytest.mark.parametrize("kernel", KERNELS)
def test_seeds_and_regressions(pairs: dict[str, tuple[Executor, Executor]], kernel: str) -> None:
    assert SEEDS and REGRESSIONS
    units = console = 0
    for path in SEEDS + REGRESSIONS:
        units += _same(pairs[kernel], path.read_bytes())
        console += pairs[kernel][0].tracer.console_units
        assert pairs[kernel][1].tracer.console_units == 0
    assert units > 0
    assert console > 100 * len(SEEDS)  # every run logs its segments, a line at a time


@pytest.mark.parametrize("kernel", KERNELS)
def test_mutated_inputs(pairs: dict[str, tuple[Executor, Executor]], kernel: str) -> None:
    seeds = [p.read_bytes() for p in SEEDS]
    mutator = ElfMutator(None, seed=11)
    rng = random.Random(11)
    taken = 0
    for _ in range(MUTATED // len(KERNELS)):
        data = mutator.mutate(rng.choice(seeds), 16384, rng.randrange(1 << 32))
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randrange(1, 4096))
        taken += _same(pairs[kernel], data) > 0
    assert taken > 0


def _runaway_copy(elf: bytes) -> bytes:
    """filesz just under 2**64 with offset 0x10: the seed's wrapping file-range check passes
    and memcpy copies from bin/init on towards the end of the ramdisk, where the source runs
    out of mapped memory: a page fault far inside a fast-forwarded range."""
    i = loads(elf)[0]
    return set_phdr(elf, i, offset=0x10, vaddr=0x400010, align=8, filesz=(1 << 64) - 0x8,
                    memsz=0x1000)


def test_a_fault_inside_a_fast_forwarded_range(pairs: dict[str, tuple[Executor, Executor]],
                                               base_elf: bytes) -> None:
    data = _runaway_copy(base_elf)
    fast, slow = pairs["seed"]
    assert _same(pairs["seed"], data) > 100_000
    result = fast.run(data)
    # the buffer overflowed is the cause; the fault in memcpy ends the run
    assert result.verdict == "crash" and "load_segments" in (result.signature or "")
    assert any(f.cls == "cpu-fault" and f.frames[0].startswith("memcpy")
               for f in result.findings)
    slow.run(data)
    a, b = fast.faults.fault, slow.faults.fault
    assert a is not None and b is not None
    assert a.vector == 14 and a.cr2 == 0x1_0100_0000  # the ramdisk's end
    assert (a.cr2, a.pc) == (b.cr2, b.pc)
    assert _ram(fast) == _ram(slow)


def test_budget_stop_inside_a_bulk_move(base_elf: bytes) -> None:
    """A budget that ends in the middle of a fast-forwarded memset stops at the same
    iteration, with the same registers, as the guest's own run."""
    rep = next(r for r in REPRODUCERS if r.bug == "RX-01")
    data = rep.make(base_elf)
    profile = load_profile("seed")
    full = Executor(profile, fast_routines=False).run(data).instructions
    budget = full - 1_000_000  # inside the 16 MiB buffer's zeroing or copy
    fast = Executor(profile, budget=budget)
    slow = Executor(profile, budget=budget, fast_routines=False)
    assert observe(fast, data) == observe(slow, data)
    assert fast.fast_units > 0
    assert fast.tracer.budget_exhausted
    assert fast.machine.reg("rip") in {site.address for site in fast.bulk_sites}
    assert fast.machine.registers() == slow.machine.registers()


def test_budget_stops_inside_console_strings(base_elf: bytes) -> None:
    """Budgets that end in the middle of a string the kernel writes to its console stop at the
    same iteration, with the same registers and console, as the guest's own run."""
    profile = load_profile("seed")
    data = set_phdr(base_elf, loads(base_elf)[0], vaddr=0x1001)  # rejected: one more line
    full = Executor(profile, fast_routines=False).run(data).instructions
    fast, slow = Executor(profile), Executor(profile, fast_routines=False)
    strings = {site.address for site in fast.bulk_sites if site.kind == "outsb"}
    inside = 0
    for budget in range(full - 400, full):
        fast.budget = slow.budget = budget
        assert observe(fast, data) == observe(slow, data)
        assert fast.machine.registers() == slow.machine.registers()
        if slow.machine.reg("rip") in strings and slow.machine.reg("rcx") > 0:
            inside += 1
            assert fast.tracer.console_units > 0
    assert inside > 20


@pytest.mark.parametrize("count_blocks", [False, True])
def test_console_strings_are_written_natively_but_their_first_byte(base_elf: bytes,
                                                                   count_blocks: bool) -> None:
    """Counting per block, a console string's site has no code hook: the guest writes the
    first byte, and the block hook, at the block each later iteration starts, the rest.
    Per instruction, the code hook writes them all. The kernel writes a log line with one
    `rep outsb`."""
    ex = Executor(load_profile("seed"), count_blocks=count_blocks)
    slow = Executor(load_profile("seed"), fast_routines=False)
    assert ex.run(base_elf).instructions == slow.run(base_elf).instructions
    assert ex.console() == slow.console()
    written = ex.tracer.console()
    lines = written.count(b"\n")
    assert lines >= 5
    left = lines if count_blocks else 0
    assert ex.tracer.console_units == len(written) - left


@pytest.mark.parametrize("count_blocks", [False, True])
def test_cycle_probes_are_not_counted_in_bulk_moves(base_elf: bytes, count_blocks: bool) -> None:
    """The cycle search probes at 4096, 8192, ... instructions outside the bulk moves: the
    tracer's floating stop moves on with every iteration performed natively, so a run zeroing
    and copying 16 MiB stops at exactly those counts, and at nothing in between. Counting per
    block, a probe stops at the first block entry from its count on (a probe needs no exact
    place), and the next probe is twice as far."""
    from kernel_emu import cycles

    data = next(r for r in REPRODUCERS if r.bug == "RX-01").make(base_elf)
    ex = Executor(load_profile("seed"), watchdog=WATCHDOG, count_blocks=count_blocks)
    ex.run(data)
    finder = ex.watchdog.cycles
    assert finder is not None
    probes = finder.probes
    own = ex.tracer.instructions - ex.fast_units
    assert ex.fast_units > 4_000_000
    if count_blocks:
        wanted = [cycles.FIRST_PROBE] + [2 * at for at, _ in probes[:-1]]
        # no block of this kernel is 64 instructions long
        assert all(0 <= at - want < 64 for (at, _), want in zip(probes, wanted, strict=True))
    else:
        assert [at for at, _ in probes] == [cycles.FIRST_PROBE << i for i in range(len(probes))]
    assert probes[-1][0] * 2 > own
    assert any(units > 0 for _, units in probes)  # a stop that bulk moves pushed back
    assert finder.idle_stops == 0


def test_snapshot_runs_equal_full_boots(base_elf: bytes) -> None:
    profile = load_profile("seed")
    snap = Executor(profile)
    full = Executor(profile, snapshot=False)
    for rep in REPRODUCERS:
        data = rep.make(base_elf)
        assert snap.run(data).comparable() == full.run(data).comparable(), rep.bug
    assert full.fast_units > 0


def test_pure_python_tracer_agrees(base_elf: bytes) -> None:
    profile = load_profile("seed")
    native = Executor(profile, budget=20_000_000)
    python = Executor(profile, native=False, budget=20_000_000)
    data = _runaway_copy(base_elf)[:0x2000]
    for sample in (base_elf, data):
        a, b = native.run(sample), python.run(sample)
        assert a.comparable() == b.comparable()
        assert a.instructions == b.instructions
    assert python.fast_units == 0


def _restore_noting_pages(ex: Executor) -> dict[int, int] | None:
    """Restore `ex`; bank -> mask of the pages it restored (None: everything)."""
    pages = ex.written.since_snapshot()  # consumes what the run left: hand it over
    ex.restore(pages)
    return pages


@pytest.mark.parametrize("track_writes", [False, True], ids=["dirty-bits", "write-hook"])
def test_ram_is_restored_byte_for_byte(monkeypatch: pytest.MonkeyPatch, base_elf: bytes,
                                      track_writes: bool) -> None:
    """The restore after a fast-forwarded run finds the same written pages and leaves RAM as
    after the guest's own run: exactly the snapshot with the Dirty-bit log. (With the write
    hook, a few pages keep page-table bits the CPU set behind the hook, fast path or not.)"""
    if track_writes:  # the fallback when page-table Dirty bits cannot be used
        monkeypatch.setattr(dirtypages, "page_table_log", lambda *_args: None)
    profile = load_profile("seed")
    fast, slow = Executor(profile), Executor(profile, fast_routines=False)
    assert (fast.written.log is None) == track_writes
    units = 0
    for data in [*(r.make(base_elf) for r in REPRODUCERS), _runaway_copy(base_elf)]:
        fast.run(data)
        slow.run(data)
        units += fast.fast_units
        pages = [_restore_noting_pages(ex) for ex in (fast, slow)]
        assert pages[0] == pages[1]
        assert _ram(fast) == _ram(slow)
        if not track_writes:
            assert _differences(fast) == []
    assert units > 0


def test_bulk_sites_come_from_the_image_symbols() -> None:
    ex = Executor(load_profile("seed"))
    kinds = {site.kind for site in ex.bulk_sites}
    assert kinds == {"stosq", "movsq", "outsb"}
    for site in ex.bulk_sites:
        if site.kind == "outsb":  # inlined wherever the kernel logs
            assert ex.image.bytes_at(site.address, 2) == b"\xf3\x6e"
        else:
            assert any(lo <= site.address < hi for lo, hi in ex.bulk_ranges)
    assert sum(site.kind == "outsb" for site in ex.bulk_sites) > 5
    assert Executor(load_profile("seed"), fast_routines=False).bulk_sites == ()

