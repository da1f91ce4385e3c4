"""The user-memory contents oracle reads a small segment's windows in one go: the findings are
those of reading each window apart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu import pagewalk, userspace
from kernel_emu.executor import Executor
from kernel_emu.machine import Machine
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
        # user memory as the kernel left it; then with one byte of a segment's file data
        # changed, near either end (the mutants that come out wrong on their own are rare)
        for spoil in (False, True):
            undo = _spoil_a_byte(rng, m, translate, result.expected_segments) if spoil \
                else None
            together = userspace.content_findings(m, translate, result.expected_segments,
                                                  data, [])
            with monkeypatch.context() as patch:
                patch.setattr(userspace, "WHOLE_READ", -1)  # every window read apart
                apart = userspace.content_findings(m, translate, result.expected_segments,
                                                   data, [])
            if undo is not None:
                m.write(*undo)
            assert together == apart
            compared += 1
            found += bool(apart)
    assert compared > 100 and found > 20, (compared, found)


def _spoil_a_byte(rng: random.Random, m: Machine, translate: userspace.Translate,
                  segments: list[dict[str, int]]) -> tuple[int, bytes] | None:
    """Flip a bit of a segment's first or last file byte in user memory; (where, what to put
    back), or None when no such byte is mapped."""
    segs = [s for s in segments if 0 < s["filesz"] <= s["memsz"]]
    if not segs:
        return None
    seg = rng.choice(segs)
    vaddr = seg["vaddr"] + rng.choice((0, seg["filesz"] - 1))
    mp = translate(vaddr)
    if mp is None:
        return None
    at = mp.paddr + vaddr - mp.vaddr
    if m.bank_for(at) is None:
        return None
    old = m.read(at, 1)
    m.write(at, bytes([old[0] ^ 0x40]))
    return at, old
