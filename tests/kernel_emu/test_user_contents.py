"""The user-memory contents oracle reads a small segment's windows in one go: the findings are
those of reading each window apart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu import pagewalk, userspace
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

SEEDS = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))


def test_a_small_segment_read_in_one_go_reads_as_its_windows_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Executor(load_profile("seed"), explain=False, causes=False)
    seeds = [p.read_bytes() for p in SEEDS]
    mutator = ElfMutator(None, seed=3)
    rng = random.Random(3)
    compared = found = 0
    for _ in range(400):
        data = mutator.mutate(rng.choice(seeds), 16384, rng.randrange(1 << 32))
        result = ex.run(data)
        if result.stop != "until":
            continue
        m = ex.machine
        cr3 = m.reg("cr3")
        translate = userspace._translator(m, cr3, pagewalk.walk_user(m, cr3, set(), runs=True))
        together = userspace.content_findings(m, translate, result.expected_segments, data, [])
        with monkeypatch.context() as patch:
            patch.setattr(userspace, "WHOLE_READ", -1)  # every window read apart
            apart = userspace.content_findings(m, translate, result.expected_segments, data,
                                               [])
        assert together == apart
        compared += 1
        found += bool(apart)
    assert compared > 50 and found > 0
