"""A fuzzing job's executor leaves out what only shows a Result with nothing to report
(Executor(details=False)): every run gets the same verdict, signature and findings as in
full, a crash the same Result in every field, and a run with nothing to report only its
backtrace and heap blocks left out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.reproducers import REPRODUCERS

SEEDS = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))
SHOWN_ONLY = ("backtrace", "heap_blocks")


@pytest.mark.parametrize("kernel", ["seed", "fixed"])
def test_a_run_without_details_judges_as_in_full(base_elf: bytes, kernel: str) -> None:
    full = Executor(load_profile(kernel), causes=False)
    lean = Executor(load_profile(kernel), causes=False, details=False)
    starts = [p.read_bytes() for p in SEEDS]
    inputs = [*(r.make(base_elf) for r in REPRODUCERS), *starts]
    mutator = ElfMutator(None, seed=3)
    rng = random.Random(3)
    inputs += [mutator.mutate(rng.choice(starts), 16384, rng.randrange(1 << 32))
               for _ in range(300)]
    crashes = quiet = 0
    for data in inputs:
        want, got = full.run(data).to_json(), lean.run(data).to_json()
        if want["verdict"] == "crash":
            crashes += 1
            assert got == want
            continue
        quiet += 1
        assert want["backtrace"], "a Result in full has its backtrace"
        assert got["backtrace"] == [] and got["heap_blocks"] == []
        assert {k: v for k, v in got.items() if k not in SHOWN_ONLY} == \
            {k: v for k, v in want.items() if k not in SHOWN_ONLY}
    # the fixed build has nothing to report, by design
    assert quiet > 30 and (crashes > 30 if kernel == "seed" else crashes == 0), (crashes, quiet)
