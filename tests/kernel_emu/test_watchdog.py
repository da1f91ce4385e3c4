"""The progress watchdog: a fuzzer's early verdict on stalled runs that changes nothing else."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu import dirtypages
from kernel_emu.dirtylog import MAX_PAGES, MAX_TABLES
from kernel_emu.dirtypages import CHECKPOINT_ACCESSED_LEVEL
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.kernel_emu.speedups import observe
from tests.reproducers import REPRODUCERS, get_phdr, loads, set_phdr

BASE = (Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
WATCHDOG = 200_000


@pytest.fixture(scope="module")
def plain() -> Executor:
    return Executor(load_profile("seed"))


@pytest.fixture(scope="module")
def watched() -> Executor:
    return Executor(load_profile("seed"), watchdog=WATCHDOG)


def _big_bss(mib: int) -> bytes:
    last = loads(BASE)[-1]
    return set_phdr(BASE, last, memsz=get_phdr(BASE, last)["filesz"] + mib * 0x100000)


@pytest.mark.parametrize("bug", [r for r in REPRODUCERS if r.bug != "RX-06"],
                         ids=[r.bug for r in REPRODUCERS if r.bug != "RX-06"])
def test_results_are_unchanged_when_the_guest_makes_progress(plain: Executor,
                                                             watched: Executor, bug) -> None:
    # RX-01 needs ~4.5 million instructions (16 MiB of buffers): many checkpoints, all resumed
    data = bug.make(BASE)
    assert watched.run(data).comparable() == plain.run(data).comparable()
    assert watched.stalled_at == 0


def test_a_long_legitimate_load_runs_to_its_end(plain: Executor, watched: Executor) -> None:
    data = _big_bss(4)
    expected = plain.run(data)
    assert expected.verdict == "ok" and expected.instructions > 4 * WATCHDOG
    assert watched.run(data).comparable() == expected.comparable()


def test_a_stalled_loop_is_a_hang_with_the_same_signature(plain: Executor,
                                                          watched: Executor) -> None:
    data = next(r for r in REPRODUCERS if r.bug == "RX-06").make(BASE)
    full = plain.run(data)
    early = watched.run(data)
    # a program-header stride of 0 (the cause) spins in the walk (the hang, its consequence)
    assert [f.cls for f in full.findings] == [f.cls for f in early.findings] == [
        "unchecked-field", "hang"]
    assert early.signature == full.signature
    assert watched.stalled_at > 0
    assert early.instructions < full.instructions // 20
    assert "watchdog" in early.findings[-1].evidence[0]
    # the next run on the same executor starts with a clean slate
    assert watched.run(BASE).comparable() == plain.run(BASE).comparable()
    assert watched.stalled_at == 0


def test_python_tracer_agrees_on_a_watchdog_stop() -> None:
    data = next(r for r in REPRODUCERS if r.bug == "RX-06").make(BASE)
    native = Executor(load_profile("seed"), watchdog=WATCHDOG).run(data)
    python = Executor(load_profile("seed"), watchdog=WATCHDOG, native=False).run(data)
    assert python.comparable() == native.comparable()


def test_a_segment_table_cut_off_by_the_budget_is_not_a_short_one() -> None:
    ex = Executor(load_profile("fixed"))
    full = ex.run(BASE)
    assert full.verdict == "ok"
    cut_runs = 0
    for budget in range(ex.snapshot_instructions + 1000, full.instructions, 97):
        ex.budget = budget
        result = ex.run(BASE)
        said = "[elf] segments count=3" in result.log
        if said and result.log.count("[elf] seg ") < 3:
            cut_runs += 1
            assert result.crash_class == "hang"
            assert all(f.field != "segments" for f in result.findings), result.findings
    assert cut_runs > 0  # some budget really did stop the kernel inside its table


def _checkpoint_inputs(base_elf: bytes) -> list[bytes]:
    """Runs that meet checkpoints where they make progress, inside bulk moves and outside,
    and runs that stall or loop (the endless loop and its mutants)."""
    seeds = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))
    starts = [*(r.make(base_elf) for r in REPRODUCERS), *(p.read_bytes() for p in seeds),
              *(_big_bss(mib) for mib in (1, 3))]
    mutator, rng = ElfMutator(None, seed=7), random.Random(7)
    mutants = [mutator.mutate(rng.choice(starts), 16384, rng.randrange(1 << 32))
               for _ in range(120)]
    return starts + mutants


@pytest.mark.parametrize(("blocks", "cycles"), [(True, True), (True, False), (False, False)],
                         ids=["per-block", "per-block-no-cycle-search", "per-instruction"])
def test_the_checkpoints_the_tracer_passes_leave_each_run_as_a_stop_there_leaves_it(
        base_elf: bytes, blocks: bool, cycles: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native tracer passes a checkpoint where the run made progress with no stop: every
    run ends as it does when the guest stops at each checkpoint for the watchdog's Python,
    to its recent blocks, coverage and count (the entry of the resume included), with the
    same stall verdicts; checkpoints every 10,000 instructions. Without the cycle search the
    endless loops are stalls at checkpoints the tracer was handed (with one, a proven cycle
    takes the checkpoints back)."""
    ex = Executor(load_profile("seed"), coverage=True, watchdog=10_000, count_blocks=blocks,
                  skip_cycles=cycles)
    passed = stalled = 0
    for data in _checkpoint_inputs(base_elf):
        natively = observe(ex, data)
        passed += ex.watchdog.passed_natively
        with monkeypatch.context() as patch:
            patch.setattr(ex.watchdog, "_native", None)
            at_stops = observe(ex, data)
        assert ex.watchdog.passed_natively == 0
        assert natively == at_stops, data[:64]
        stalled += ex.stalled_at > 0
    assert passed > 500 and stalled >= 3, (passed, stalled)


def test_inside_a_bulk_routine_the_tracer_passes_a_checkpoint_with_no_page_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Dirty count held still (0 in the watchdog's Python; in the tracer, the count
    under an empty table), only being in a bulk routine is progress. A checkpoint halfway
    through a load that zeroes a megabyte falls in its memset: the tracer passes it, and the
    run ends as when the watchdog's Python judges it."""
    data = _big_bss(1)
    plain = Executor(load_profile("seed"))
    whole = plain.run(data).instructions
    assert plain.fast_units > whole // 2  # mostly the memset: its middle is in it
    ex = Executor(load_profile("seed"), coverage=True, watchdog=whole // 2, skip_cycles=False)
    empty = next(a for a in range(0x1000, 0x80000, 0x1000)
                 if ex.machine.read(a, 0x1000) == bytes(0x1000))
    monkeypatch.setattr(dirtypages, "dirty_count", lambda *args, **kw: 0)
    ex.watchdog._native.checkpoint_walk(empty, CHECKPOINT_ACCESSED_LEVEL, MAX_PAGES,
                                        MAX_TABLES, ex.bulk_ranges)
    natively = observe(ex, data)
    assert ex.watchdog.passed_natively == 1 and ex.stalled_at == 0
    assert ex.machine.read(empty, 0x1000) == bytes(0x1000)
    with monkeypatch.context() as patch:
        patch.setattr(ex.watchdog, "_native", None)
        assert observe(ex, data) == natively
