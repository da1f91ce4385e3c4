"""The user-space oracle scans runs of consecutive pages; every check must name the same
page as a scan of the pages one by one (the reference below)."""

from __future__ import annotations

import bisect
import random
from collections import Counter

from kernel_emu import oracles, userspace
from kernel_emu.machine import PAGE
from kernel_emu.pagewalk import Mapping

USER_TOP = 0x8000_0000_0000


def _pages(runs: list[Mapping]) -> list[Mapping]:
    return [run.leaf(k) for run in runs for k in range(run.count)]


def _bad_by_page(runs: list[Mapping], kernel_phys: list[tuple[int, int, str]],
                 tables: set[int]) -> tuple[int, int, str | None] | None:
    for mp in _pages(runs):
        if mp.vaddr >= USER_TOP:
            return mp.vaddr, mp.paddr, None
        hit = next((n for lo, hi, n in kernel_phys if lo < mp.paddr + mp.size and mp.paddr < hi),
                   None)
        if hit is None and any(mp.paddr <= t < mp.paddr + mp.size for t in tables):
            hit = "a page table of this address space"
        if hit is not None:
            return mp.vaddr, mp.paddr, hit
    return None


def _uncovered_by_page(runs: list[Mapping], merged: list[tuple[int, int]],
                       stack: tuple[int, int] | None) -> int | None:
    for mp in _pages(runs):
        i = bisect.bisect_right(merged, (mp.vaddr, 1 << 65)) - 1
        inside = i >= 0 and merged[i][0] <= mp.vaddr <= merged[i][1]
        near = stack is not None and stack[0] <= mp.vaddr <= stack[1]
        if not inside and not near and mp.vaddr < USER_TOP:
            return mp.vaddr
    return None


def _random_runs(rng: random.Random) -> list[Mapping]:
    runs = []
    vaddr = rng.choice([0, 0x40_0000, USER_TOP - 40 * PAGE])
    for _ in range(rng.randrange(1, 6)):
        size = rng.choice([PAGE, PAGE, PAGE, 0x20_0000])
        vaddr = (vaddr + size - 1) // size * size
        count = 1 if size > PAGE else rng.randrange(1, 80)
        paddr = rng.choice([0, 0x10_0000, 0x20_0000, 0x30_0000, 0x400_0000]) // size * size
        descending = count > 1 and rng.random() < 0.5
        paddr += rng.randrange(0, 64) * size // (size // PAGE)
        if descending:
            paddr += (count - 1) * size
        runs.append(Mapping(vaddr, paddr, size, True, True, False, count, descending))
        vaddr = runs[-1].end + rng.choice([0, PAGE, 3 * PAGE, 0x20_0000])
    return runs


def test_run_checks_name_the_page_a_page_scan_names() -> None:
    rng = random.Random(5)
    found = {"upper": 0, "kernel": 0, "table": 0, "extra": 0}
    for _ in range(3000):
        runs = _random_runs(rng)
        kernel_phys = [(rng.randrange(0, 0x50_0000), 0, name) for name in ("a", "b")]
        kernel_phys = [(lo, lo + rng.randrange(1, 0x8_0000), n) for lo, _, n in kernel_phys]
        tables = {rng.randrange(0, 0x50_0000) & ~(PAGE - 1) for _ in range(rng.randrange(4))}
        want = _bad_by_page(runs, kernel_phys, tables)
        got = userspace.first_bad_mapping(runs, USER_TOP, kernel_phys, sorted(tables))
        assert (None if got is None else tuple(got)) == want, (runs, kernel_phys, tables)
        if want is not None:
            found["upper" if want[2] is None else
                  "table" if want[2].startswith("a page table") else "kernel"] += 1

        spans = []
        for _ in range(rng.randrange(4)):
            lo = rng.choice(runs).vaddr + rng.randrange(-8, 60) * PAGE
            spans.append((lo, lo + rng.randrange(0, 40) * PAGE))
        merged = userspace.merge_pages(spans)
        top = rng.choice(runs).end - rng.randrange(0, 10) * PAGE - rng.randrange(0, 2) * 17
        stack = rng.choice([None, (top - 64 * PAGE, top)])
        want_extra = _uncovered_by_page(runs, merged, stack)
        got_extra = next((v for run in runs
                          if (v := userspace.first_uncovered(run, merged, stack, USER_TOP))
                          is not None), None)
        assert got_extra == want_extra, (runs, merged, stack)
        found["extra"] += want_extra is not None
    # every kind of verdict came up, so the comparison covered each path
    assert min(found.values()) > 50, found


def test_spinning_in_looks_up_each_block_once() -> None:
    """A hang's spot, found with one lookup per distinct block, is the one of looking up every
    recent block: the most frequent function, the first seen of a tie."""
    from kernel_emu.image import load_image
    from kernel_emu.profile import load_profile

    profile = load_profile("seed")
    image = load_image(profile.image, profile.kernel.load_base)
    text = [(s.vaddr, s.end) for s in image.segments if s.flags & 1]
    rng = random.Random(0x5B1)
    addresses = [rng.randrange(lo, hi) for lo, hi in text for _ in range(40)] + [0x10, 1 << 47]

    def by_entry(blocks: list[int]) -> tuple[str | None, str]:
        funcs: dict[str, int] = {}
        for b in blocks:
            name = image.describe(b).rsplit("+0x", 1)[0]
            funcs[name] = funcs.get(name, 0) + 1
        best = max(funcs.values(), default=0)
        spot = next((n for n, c in funcs.items() if c == best), None)
        return spot, ", ".join(sorted({f"{b:#x}" for b in blocks})[:8])

    ties = 0
    for _ in range(2000):
        pool = rng.sample(addresses, rng.randint(1, 6))
        blocks = [rng.choice(pool) for _ in range(rng.choice([0, 1, 2, 7, 64]))]
        assert oracles.spinning_in(image, blocks) == by_entry(blocks)
        # what a hang finding reads, kept by image and blocks, says the same
        spot, loop, funcs = oracles._loop(image, blocks)
        assert (spot, loop) == by_entry(blocks)
        assert funcs == {image.describe(b).rsplit("+0x", 1)[0] for b in blocks}
        counts = sorted(Counter(image.describe(b).rsplit("+0x", 1)[0] for b in blocks).values())
        ties += len(counts) > 1 and counts[-1] == counts[-2]
    assert ties > 50
    assert 0 < len(oracles._LOOPS) <= oracles.LOOPS_KEPT


def test_segments_that_meet_are_found_as_a_pairwise_test_finds_them() -> None:
    rng = random.Random(11)
    met = 0
    for _ in range(3000):
        spans = []
        for _ in range(rng.randrange(0, 9)):
            lo = rng.randrange(0, 24) * rng.choice([1, PAGE])
            spans.append((lo, lo + rng.choice([0, 0, 1, 5, PAGE, 3 * PAGE])))
        if spans and rng.random() < 0.3:
            spans.append(rng.choice(spans))  # the same span twice
        want = [lo < hi and any(j != i and a < hi and lo < b for j, (a, b) in enumerate(spans))
                for i, (lo, hi) in enumerate(spans)]
        assert userspace.overlapping(spans) == want, spans
        met += sum(want)
    assert met > 1000


def test_pages_read_off_the_walk_are_the_pages_a_walk_of_each_finds() -> None:
    """The oracle's translator answers user pages from `walk_user`'s runs and walks the rest:
    on the page tables of a real ring-3 entry it gives what a walk of each address gives."""
    from pathlib import Path

    from kernel_emu import pagewalk
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    executor = Executor(load_profile("seed"), causes=False)
    seeds = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))
    entered = 0
    for seed in seeds[:8]:
        if executor.run(seed.read_bytes()).stop != "until":
            continue
        entered += 1
        m = executor.machine
        cr3 = m.reg("cr3")
        runs = pagewalk.walk_user(m, cr3, runs=True)
        translate = userspace._translator(m, cr3, runs)
        probes = [0, PAGE, 0x20_0000, 0x7FFF_FFFF_F000, 0x8000_0000_0000,
                  0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_F000, executor.image.start]
        for run in runs:
            for k in {0, 1, run.count // 2, run.count - 1, run.count}:
                probes += [run.vaddr + k * run.size + d for d in (0, 5, -1)]
        for vaddr in probes:
            vaddr &= (1 << 64) - 1
            assert translate(vaddr) == pagewalk.translate(m, cr3, vaddr), hex(vaddr)
    assert entered >= 3
