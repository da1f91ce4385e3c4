"""Exact cycles skipped by whole periods change nothing but speed: every run gives the same
Result, count, watchdog stop, recent blocks, coverage and console with skipping on and off."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuzz.harness import WATCHDOG
from fuzz.mutator import ElfMutator
from kernel_emu.cycles import CycleFinder
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.tracing import MAP_SIZE
from tests.kernel_emu.speedups import KERNELS, executor_pairs, observe
from tests.reproducers import REPRODUCERS

SEEDS = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[Executor, Executor]]:
    """Per kernel: (cycle skipping on, off)."""
    return executor_pairs(skip_cycles=False)


def _same(pair: tuple[Executor, Executor], data: bytes) -> int:
    on, off = pair
    assert observe(on, data) == observe(off, data)
    assert off.skipped_instructions == 0
    return on.skipped_instructions


def _hang(base_elf: bytes) -> bytes:
    return next(r for r in REPRODUCERS if r.bug == "RX-06").make(base_elf)


def _mutants(base_elf: bytes, seed: int, count: int) -> Iterator[bytes]:
    """Mutants of the seeds and of the endless loop (many of them loop differently)."""
    starts = [p.read_bytes() for p in SEEDS] + [_hang(base_elf)] * 8
    mutator = ElfMutator(None, seed=seed)
    rng = random.Random(seed)
    for _ in range(count):
        yield mutator.mutate(rng.choice(starts), 16384, rng.randrange(1 << 32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_bug_reproducers_and_seeds(pairs: dict[str, tuple[Executor, Executor]],
                                   base_elf: bytes, kernel: str) -> None:
    for data in [*(r.make(base_elf) for r in REPRODUCERS), *(p.read_bytes() for p in SEEDS)]:
        _same(pairs[kernel], data)


def test_the_endless_loop_is_skipped(pairs: dict[str, tuple[Executor, Executor]],
                                     base_elf: bytes) -> None:
    on, _ = pairs["seed"]
    assert _same(pairs["seed"], _hang(base_elf)) > WATCHDOG
    assert on.stalled_at == 2 * WATCHDOG
    assert [f.cls for f in on.run(_hang(base_elf)).findings] == ["unchecked-field", "hang"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_mutated_inputs(pairs: dict[str, tuple[Executor, Executor]], base_elf: bytes,
                        kernel: str) -> None:
    """Mutants of the seeds and of the endless loop (many of them loop differently)."""
    skipped = 0
    for data in _mutants(base_elf, 5, 600):
        skipped += _same(pairs[kernel], data) > 0
    assert kernel == "fixed" or skipped > 0


@pytest.mark.parametrize("data", ["hang", "seed"])
def test_without_a_watchdog_the_skip_goes_to_the_budget(base_elf: bytes, data: str) -> None:
    """The farm checks a stalled run with the profile's own budget and no watchdog: the loop is
    moved on to the budget by whole periods, with the same outcome as running it."""
    profile = load_profile("seed")
    budget = 3_000_000
    on = Executor(profile, coverage=True, budget=budget)
    off = Executor(profile, coverage=True, budget=budget, skip_cycles=False)
    elf = _hang(base_elf) if data == "hang" else SEEDS[0].read_bytes()
    assert observe(on, elf) == observe(off, elf)
    if data == "hang":
        assert on.run(elf).stop == "budget"
        assert on.skipped_instructions > budget * 0.9
        assert on.stalled_at == 0
    else:
        assert on.skipped_instructions == 0


def test_under_a_watchdog_a_proven_cycle_runs_to_the_budget(base_elf: bytes) -> None:
    """With `cycles_to_budget`, the watchdog does not stop a run proven to be in an exact
    cycle: it ends at the budget, exactly as the budget alone ends it (no watchdog, every
    instruction run), and not at a checkpoint as stalled."""
    profile = load_profile("seed")
    budget = 3_000_000
    to_budget = Executor(profile, coverage=True, budget=budget, watchdog=WATCHDOG,
                         cycles_to_budget=True)
    alone = Executor(profile, coverage=True, budget=budget, skip_cycles=False)
    data = _hang(base_elf)
    assert observe(to_budget, data) == observe(alone, data)
    assert to_budget.stalled_at == 0
    assert to_budget.skipped_instructions > budget * 0.9
    assert to_budget.run(data).stop == "budget"
    # the same executor's next run is watched as before
    seed = SEEDS[0].read_bytes()
    assert observe(to_budget, seed) == observe(alone, seed)


@pytest.mark.parametrize("kernel", KERNELS)
def test_under_a_watchdog_a_run_ends_as_the_budget_or_as_the_watchdog_ends_it(
        base_elf: bytes, kernel: str) -> None:
    """Mutants of the seeds and of the endless loop: with `cycles_to_budget`, each run ends
    exactly as under the watchdog alone, or, where that stopped it as stalled, exactly as the
    budget alone ends it."""
    profile = load_profile(kernel)
    budget = 5 * WATCHDOG  # checkpoints before it
    to_budget = Executor(profile, coverage=True, budget=budget, watchdog=WATCHDOG,
                         cycles_to_budget=True)
    watched = Executor(profile, coverage=True, budget=budget, watchdog=WATCHDOG,
                       skip_cycles=False)
    alone = Executor(profile, coverage=True, budget=budget, skip_cycles=False)
    ran_on = 0
    for data in _mutants(base_elf, 11, 300):
        got = observe(to_budget, data)
        if got == observe(watched, data):
            continue
        assert watched.stalled_at and to_budget.stalled_at == 0
        assert got == observe(alone, data)
        ran_on += 1
    assert kernel == "fixed" or ran_on > 0


def test_full_boots_are_not_skipped(base_elf: bytes) -> None:
    """The cycle search is only for snapshot runs (their Dirty-bit log names the written
    pages); a full boot runs every instruction, as before."""
    profile = load_profile("seed")
    full = Executor(profile, snapshot=False, watchdog=WATCHDOG)
    plain = Executor(profile, snapshot=False, watchdog=WATCHDOG, skip_cycles=False)
    data = _hang(base_elf)
    assert full.run(data).comparable() == plain.run(data).comparable()
    assert full.stalled_at == plain.stalled_at > 0
    assert full.skipped_instructions == 0


def test_pure_python_tracer_agrees(base_elf: bytes) -> None:
    profile = load_profile("seed")
    native = Executor(profile, coverage=True, watchdog=WATCHDOG)
    python = Executor(profile, coverage=True, watchdog=WATCHDOG, native=False)
    data = _hang(base_elf)
    assert observe(native, data) == observe(python, data)
    assert python.skipped_instructions > 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_skip_refuses_what_it_cannot_account_for(native: bool) -> None:
    ex = Executor(load_profile("seed"), native=native, coverage=True)
    tracer = ex.tracer
    tracer.reset(1000)
    zeros = bytes(MAP_SIZE)
    with pytest.raises(ValueError):
        tracer.skip(10, 1, 1, zeros, zeros)  # the recent blocks are not full yet
    with pytest.raises(ValueError):
        tracer.skip(10, 1, 1, zeros, zeros[:-1])


def test_probes_made_by_the_tracer_are_the_probes_made_at_stops(
        base_elf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native tracer makes the probes in its hooks, with no stop; made at stops of the
    guest instead, each run has the same probes (counts and bulk iterations), the same
    arrivals (count, and where the search is), the same cycle proven and skipped, and
    everything else the same. One difference is by design: the tracer's probes do not count
    the pages written, so in a run with too many to capture a search may stop the guest once
    at an arrival, where the capture finds it too large; those arrivals are left out."""
    ex = Executor(load_profile("seed"), coverage=True, watchdog=WATCHDOG)
    real_init, real_arrived = CycleFinder.__init__, CycleFinder._arrived
    arrivals: list[tuple[int, int | None]] = []

    def arrived(self: CycleFinder) -> None:
        real_arrived(self)
        if not self._too_large:
            arrivals.append((self.tracer.instructions, self._address))

    monkeypatch.setattr(CycleFinder, "_arrived", arrived)

    def at_stops(self: CycleFinder, *args: Any, **kw: Any) -> None:
        real_init(self, *args, **kw)
        self._native = None

    def run(data: bytes, stops: bool) -> tuple[object, ...]:
        arrivals.clear()
        with monkeypatch.context() as patch:
            if stops:
                patch.setattr(CycleFinder, "__init__", at_stops)
            seen = observe(ex, data)
        finder = ex.watchdog.cycles
        assert finder is not None and (finder._native is None) == stops
        return seen, finder.probes[:64], list(arrivals), finder.proven, ex.skipped_instructions

    proven = probed = stopped = 0
    for data in [_hang(base_elf), *(p.read_bytes() for p in SEEDS), *_mutants(base_elf, 9, 250)]:
        native = run(data, stops=False)
        assert native == run(data, stops=True), data[:64]
        proven += native[3]
        probed += len(native[1]) > 0
        stopped += len(native[2]) > 0
    assert proven > 5 and probed > 100 and stopped > 5, (proven, probed, stopped)
