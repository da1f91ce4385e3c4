"""The progress watchdog: a fuzzer's early verdict on stalled runs that changes nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
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
