"""The lean run (Executor(lean=True), the default) changes nothing but speed: every run gives
the same Result, count, watchdog stop, recent blocks, coverage and console as without it, and
the cycle search skips the same instructions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu.executor import Executor
from tests.kernel_emu.speedups import KERNELS, executor_pairs, observe
from tests.reproducers import REPRODUCERS

SEEDS = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[Executor, Executor]]:
    """Per kernel: (lean, not lean)."""
    return executor_pairs(lean=False)


def _same(pair: tuple[Executor, Executor], data: bytes) -> int:
    lean, plain = pair
    assert observe(lean, data) == observe(plain, data)
    assert lean.skipped_instructions == plain.skipped_instructions
    return lean.skipped_instructions


@pytest.mark.parametrize("kernel", KERNELS)
def test_reproducers_seeds_and_mutants(pairs: dict[str, tuple[Executor, Executor]],
                                       base_elf: bytes, kernel: str) -> None:
    hang = next(r for r in REPRODUCERS if r.bug == "RX-06").make(base_elf)
    starts = [p.read_bytes() for p in SEEDS] + [hang] * 8
    inputs = [*(r.make(base_elf) for r in REPRODUCERS), *starts]
    mutator = ElfMutator(None, seed=11)
    rng = random.Random(11)
    inputs += [mutator.mutate(rng.choice(starts), 16384, rng.randrange(1 << 32))
               for _ in range(400)]
    skipped = sum(_same(pairs[kernel], data) > 0 for data in inputs)
    assert kernel == "fixed" or skipped > 0
