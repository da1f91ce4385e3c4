"""`fuzzfarm bench fuzz`: what the fuzzer achieves on this machine, measured side by side.

1. Feedback cost: execs/s of 1-job campaigns with guest coverage and compares on and off,
   with and without the two speed-ups (memset/memcpy bulk moves performed natively, exact
   cycles skipped under the watchdog), interleaved, medians; plus the same fixed mix of
   mutated inputs replayed through an executor with and without the feedback hooks (isolates
   the hooks from corpus drift), likewise with and without the speed-ups; and, for those
   inputs, the share of runs and of time of each way a run ends (halted after a rejection,
   entering ring 3, stopped by the watchdog, ...), with µs per run in each phase.
2. Time to the first vaddr-corruption on `seed` (as cause or consequence), median of N
   campaigns, with 1 and 2 jobs.
3. Known bugs found: a 2-job campaign on `seed`, its buckets attributed to kernel_emu/guest/
   BUGS.md by the oracle and place each bug's entry names; then the same on `fixed`, where
   any bucket is a false positive.
"""

from __future__ import annotations

import functools
import io
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz.campaign import CampaignSummary, add_run_endings, run_campaign
from fuzz.feedback import make_feedback
from fuzz.harness import WATCHDOG, JobConfig, count_run
from fuzz.mutator import ElfMutator
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.result import run_ending

SEEDS = Path(__file__).parents[1] / "corpus" / "seeds"
SEED_BUG = "vaddr-corruption:segments[0].vaddr"


def _frames(finding: dict[str, Any]) -> str:
    return " ".join(finding.get("frames") or [])


@functools.lru_cache(maxsize=4)
def _first_payload(kernel: str = "seed") -> str:
    """The address of the first payload of a build's heap, as findings print it: its base
    plus one block header, from the build's profile."""
    from kernel_emu.profile import load_profile

    heap = load_profile(kernel).heap
    return f"{heap.base + heap.header_size:#x}"


# BUGS.md, "Oracle" and "Where" of each entry: how a finding of that bug looks
KNOWN_BUGS: dict[str, Callable[[dict[str, Any]], bool]] = {
    # the LoadedElf handed the segment table's own block (the heap's first payload) again
    "RX-01": lambda f: (f["class"] == "heap-corruption"
                        and any(f"returned {_first_payload()}" in e and "overlaps live" in e
                                for e in f.get("evidence", [])))
    or (f["class"] == "vaddr-corruption" and f.get("field") == "segments[0].vaddr"),
    "RX-02": lambda f: f["class"] == "cpu-fault" and "load_segments" in _frames(f),
    "RX-03": lambda f: f["class"] == "vaddr-corruption"
    and str(f.get("field") or "").endswith("].memsz"),
    "RX-04": lambda f: f["class"] == "kernel-mapping",
    "RX-05": lambda f: f["class"] == "heap-corruption" and not KNOWN_BUGS["RX-01"](f),
    "RX-06": lambda f: f["class"] == "hang" and "collect_segments" in _frames(f),
    "RX-07": lambda f: f["class"] == "kernel-panic"
    and any("divisor of zero" in e for e in f.get("evidence", [])),
    "RX-08": lambda f: f["class"] == "bad-entry",
    "RX-09": lambda f: f["class"] == "out-of-memory",
}


def attribute(summary: CampaignSummary) -> dict[str, int]:
    """BUGS.md id -> number of buckets whose report shows that bug."""
    found: dict[str, int] = {}
    for bucket in summary.buckets:
        try:
            report = json.loads(bucket.reproducer.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        for bug, matches in KNOWN_BUGS.items():
            if any(matches(f) for f in report.get("findings", [])):
                found[bug] = found.get(bug, 0) + 1
    return found


def _campaign(kernel: str, jobs: int, out: Path, checkout: Path | None = None,
              **kw: Any) -> CampaignSummary:
    config = JobConfig(kernel=kernel, out=str(out.resolve()), seeds=[str(SEEDS.resolve())], **kw)
    return run_campaign(config, jobs, live=False, stream=io.StringIO(), checkout=checkout)


def _replay_rates(kernel: str, inputs: list[bytes], repeats: int,
                  setups: list[tuple[bool, bool, bool]]) -> list[tuple[float, float]]:
    """Per (speed-ups, lean, block counting) setup: median execs/s replaying `inputs` with the
    feedback hooks and without; every setup and both executors of each take their turn in
    every repeat."""
    profile = load_profile(kernel)
    runs = []
    for speedups, lean, blocks in setups:
        kw = {"fast_routines": speedups, "skip_cycles": speedups, "lean": lean,
              "count_blocks": blocks}
        on = Executor(profile, coverage=True, watchdog=WATCHDOG, explain=False, causes=False,
                      cycles_to_budget=True, **kw)
        feedback = make_feedback()
        on.add_machine_hook(feedback.attach)
        off = Executor(profile, watchdog=WATCHDOG, explain=False, causes=False,
                       cycles_to_budget=True, **kw)
        runs.append(((on, feedback), (off, None)))
    rates: list[tuple[list[float], list[float]]] = [([], []) for _ in setups]
    for _ in range(repeats):
        for pair, got in zip(runs, rates, strict=True):
            for (executor, feedback), into in zip(pair, got, strict=True):
                start = time.perf_counter()
                for data in inputs:
                    executor.run(data)
                    if feedback is not None:
                        feedback.collect(executor.tracer.coverage(),
                                         executor.tracer.coverage_lines())
                into.append(len(inputs) / (time.perf_counter() - start))
    return [(statistics.median(on), statistics.median(off)) for on, off in rates]


def _by_ending(kernel: str, inputs: list[bytes]) -> dict[str, list[float]]:
    """Replaying `inputs` as a fuzzing job runs them (feedback on): per way a run ended, [runs,
    seconds, and seconds in prepare, guest, oracles], as a job's statistics count them."""
    executor = Executor(load_profile(kernel), coverage=True, watchdog=WATCHDOG, explain=False,
                        causes=False, cycles_to_budget=True)
    feedback = make_feedback()
    executor.add_machine_hook(feedback.attach)
    for data in inputs[:50]:  # the translated code and the caches, as in a running job
        executor.run(data)
    phases = executor.phase_seconds
    table: dict[str, list[float]] = {}
    for data in inputs:
        before = (phases["prepare"], phases["guest"], phases["oracles"])
        start = time.perf_counter()
        result = executor.run(data)
        feedback.collect(executor.tracer.coverage(), executor.tracer.coverage_lines())
        count_run(table, run_ending(result.stop, result.verdict, bool(executor.stalled_at)),
                  time.perf_counter() - start, phases, before)
    return table


def _print_endings(title: str, table: dict[str, list[float]]) -> None:
    """A table of runs by how they ended (`_by_ending`, a job's `run_endings`): each kind's
    share of the runs and of their time, and its µs a run in all and in each phase."""
    runs, seconds = sum(r[0] for r in table.values()), sum(r[1] for r in table.values())
    if not runs or seconds <= 0:
        print(f"   {title}: no runs")
        return
    print(f"   {title}: {seconds / runs * 1e6:,.0f} µs a run")
    print(f"     {'':26} {'runs':>6} {'time':>6} {'µs a run':>9} {'prepare':>8} {'guest':>7} "
          f"{'oracles':>8}")
    for name, row in sorted(table.items(), key=lambda kv: -kv[1][1]):
        n, took, *split = row
        per = [x / n * 1e6 for x in split]
        print(f"     {name:26} {n / runs:6.1%} {took / seconds:6.1%} {took / n * 1e6:9,.0f} "
              f"{per[0]:8,.0f} {per[1]:7,.0f} {per[2]:8,.0f}", flush=True)


def _mutated_inputs(count: int, seed: int = 7) -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(SEEDS.glob("*.elf"))]
    mutator = ElfMutator(None, seed=seed)
    rng = random.Random(seed)
    return [mutator.mutate(rng.choice(seeds), 32768, rng.randrange(1 << 32))
            for _ in range(count)]


def bench_fuzz(kernel: str, seconds: float, repeats: int, first_runs: int,
               bug_seconds: float, first_cap: float, fixed_seconds: float = 600.0,
               parts: str = "123", other: Path | None = None) -> int:
    """`other`: another checkout whose default campaigns part 1 runs too, interleaved with
    this one's, by that checkout's own code (the figure before a change, side by side)."""
    print(f"bench fuzz: kernel {kernel}, seeds {len(list(SEEDS.glob('*.elf')))} files"
          + (f"; the other checkout: {other}" if other else ""))
    # a worker that is still winding down may write into it while it is removed
    with tempfile.TemporaryDirectory(prefix="fuzzfarm-bench-",
                                     ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        n = 0

        def fresh() -> Path:
            nonlocal n
            n += 1
            return root / f"c{n}"

        if "1" in parts:
            _feedback_cost(kernel, seconds, repeats, fresh, other)
        if "2" in parts:
            _time_to_first(first_runs, first_cap, fresh)
        if "3" in parts:
            _known_bugs(bug_seconds, fixed_seconds, fresh)
    return 0


# (label, feedback, native bulk moves, cycle skipping, lean runs, block counting), run
# interleaved
_SETUPS = [("all speed-ups (default)      ", True, True, True, True, True),
           ("all, without block counting  ", True, True, True, True, False),
           ("both, without the lean runs  ", True, True, True, False, False),
           ("native bulk moves only       ", True, True, False, False, False),
           ("none                         ", True, False, False, False, False),
           ("all speed-ups (default)      ", False, True, True, True, True),
           ("none                         ", False, False, False, False, False)]


def _feedback_cost(kernel: str, seconds: float, repeats: int, fresh: Callable[[], Path],
                   other: Path | None = None) -> None:
    rates: list[list[float]] = [[] for _ in _SETUPS]
    theirs: list[float] = []
    defaults: list[CampaignSummary] = []  # this checkout's default campaigns
    # Each repeat has a fuzzing seed of its own (libFuzzer's, mixed into the ELF mutator's;
    # a campaign's job n fuzzes with its seed + n + 1), the same for every setup and the
    # other checkout in it. With one seed for all of them, the repeats of a setup were one
    # campaign up to timing: what it ran, and so its rate, was that seed's draw
    for seed in range(repeats):  # interleaved: another load on the machine hits all alike
        for got, (_, feedback, fast, skip, lean, blocks) in zip(rates, _SETUPS, strict=True):
            summary = _campaign(kernel, 1, fresh(), seconds=seconds, coverage=feedback,
                                compares=feedback, fast_routines=fast, skip_cycles=skip,
                                lean=lean, count_blocks=blocks, seed=seed)
            got.append(summary.execs_per_second)
            if got is not rates[0]:
                continue
            defaults.append(summary)
            if other is not None:
                # right after this checkout's default: the same setup by the other's code
                summary = _campaign(kernel, 1, fresh(), checkout=other, seconds=seconds,
                                    seed=seed)
                if not summary.execs:
                    raise RuntimeError(f"the other checkout's campaign failed: "
                                       f"{'; '.join(summary.job_failures) or 'no execution'}")
                theirs.append(summary.execs_per_second)
    med = [statistics.median(r) for r in rates]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "inf"

    print(f"\n1. campaigns of {seconds:.0f} s, 1 job, {repeats} interleaved repeats, fuzzing "
          f"seeds 1-{repeats}, one per repeat (execs/s, median [each repeat]):", flush=True)
    for (label, feedback, *_), m, r in zip(_SETUPS, med, rates, strict=True):
        shown = ", ".join(f"{x:,.0f}" for x in r)
        print(f"   feedback {'on ' if feedback else 'off'}, {label}: {m:7,.0f}  [{shown}]")
    if other is not None:
        shown = ", ".join(f"{x:,.0f}" for x in theirs)
        print(f"   feedback on, the other checkout, its defaults: "
              f"{statistics.median(theirs):7,.0f}  [{shown}]")
        print(f"   feedback on, default: this / the other checkout "
              f"{ratio(med[0], statistics.median(theirs))}")
    print(f"   feedback on: all / without block counting (the old default): "
          f"{ratio(med[0], med[1])}; all / without that and the lean runs: "
          f"{ratio(med[0], med[2])}; all / none: {ratio(med[0], med[4])}; feedback off / on "
          f"with all: {ratio(med[5], med[0])}, with none: {ratio(med[6], med[4])}")
    endings = add_run_endings(d.run_endings for d in defaults)
    ran = sum(row[1] for row in endings.values())
    # one job each: its execs over its rate are its seconds fuzzing
    fuzzing = sum(d.execs / d.rate for d in defaults if d.rate > 0)
    share = f"; runs are {ran / fuzzing:.0%} of the jobs' time" if fuzzing > 0 else ""
    _print_endings(f"where the default campaigns' time goes, by how a run ends (the jobs' own "
                   f"clocks{share})", endings)
    inputs = _mutated_inputs(1000)
    setups = [(True, True, True, "all speed-ups"),
              (True, True, False, "without block counting"),
              (True, False, False, "nor the lean runs"), (False, False, False, "none")]
    replayed = _replay_rates(kernel, inputs, 3,
                             [(fast, lean, blocks) for fast, lean, blocks, _ in setups])
    print("   the same 1,000 mutated inputs replayed, the setups interleaved (execs/s, median "
          "of 3):")
    for (_, _, _, label), (r_on, r_off) in zip(setups, replayed, strict=True):
        print(f"     {label:22}: feedback on {r_on:7,.0f}, off {r_off:7,.0f}, "
              f"off/on {r_off / r_on:.2f}x")
    print(f"     feedback on: all / without block counting "
          f"{ratio(replayed[0][0], replayed[1][0])}", flush=True)
    _print_endings("where the replay's time goes (feedback on, all speed-ups), by how a run "
                   "ends", _by_ending(kernel, inputs))


def _time_to_first(first_runs: int, first_cap: float, fresh: Callable[[], Path]) -> None:
    print(f"\n2. time to the first finding on seed, as cause or consequence ({first_runs} "
          f"campaigns each, capped at {first_cap:.0f} s)", flush=True)
    for target, label in (("vaddr-corruption", "any vaddr-corruption"),
                          (SEED_BUG, "the seed bug (segment 0's vaddr = the heap's base)")):
        for jobs in (1, 2):
            times = []
            for _ in range(first_runs):
                s = _campaign("seed", jobs, fresh(), seconds=first_cap, stop_on=target)
                times.append(s.first_class.get(target, float("inf")))
            shown = ", ".join(f"{t:.1f}" for t in times)
            print(f"   {label}, {jobs} job(s): median {statistics.median(times):.1f} s  "
                  f"[{shown}]", flush=True)


def _known_bugs(bug_seconds: float, fixed_seconds: float, fresh: Callable[[], Path]) -> None:
    s = _campaign("seed", 2, fresh(), seconds=bug_seconds)
    found = attribute(s)
    print(f"\n3. seed, 2 jobs, {bug_seconds:.0f} s: {s.execs:,} execs "
          f"({s.execs_per_second:,.0f}/s), {len(s.buckets)} buckets, "
          f"{len(found)} of {len(KNOWN_BUGS)} BUGS.md bugs: "
          + ", ".join(f"{b} ({k} bucket{'s' if k > 1 else ''})"
                      for b, k in sorted(found.items())))
    for bug, when in sorted(_first_times(s, found).items()):
        print(f"   {bug} first seen after {when:.1f} s")
    f = _campaign("fixed", 2, fresh(), seconds=fixed_seconds)
    print(f"   fixed, 2 jobs, {fixed_seconds:.0f} s: {f.execs:,} execs "
          f"({f.execs_per_second:,.0f}/s), "
          f"{len(f.buckets)} buckets, {f.harness_errors} harness errors")


def _first_times(summary: CampaignSummary, found: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bucket in summary.buckets:
        try:
            report = json.loads(bucket.reproducer.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        when = summary.first_seen.get(bucket.signature)
        if when is None:
            continue
        for bug, matches in KNOWN_BUGS.items():
            if bug in found and any(matches(x) for x in report.get("findings", [])):
                out[bug] = min(out.get(bug, when), when)
    return out
