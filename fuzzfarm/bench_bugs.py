"""`fuzzfarm bench bugs`: how well the farm finds planted bugs, measured as fuzzing papers
measure it: Magma's reached/triggered canaries, time to bug with Kaplan–Meier survival,
buckets per bug.

For each kernel build, N trials of T seconds: each a fresh campaign from the bundled seeds
with J jobs, the jobs recording when each planted bug's canary (the profile's `[canaries]`)
was first reached and triggered. After a trial the campaign's findings are booted again as
triage boots them, grouped into buckets by the signature they get, and the canaries read: a
bucket is the bug all its inputs trigger, or "unattributed" when they trigger none (on a
build without canaries, such as `fixed`, every bucket is a finding, and the goal is none).

Per bug: trials in which it was reached, triggered and bucketed; the median time to its first
bucket by Kaplan–Meier (a trial that never bucketed it is censored at T); buckets per bug (the
mean over the trials that bucketed it); how many merges (buckets of one bug beyond the first)
and splits (buckets that are several bugs) a reviewer would have had to make. Results go to
`OUT/bugs.json` after every trial (a stopped benchmark keeps what it measured), the survival
curves to `OUT/survival-<kernel>.svg`.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuzz.campaign import CampaignSummary, run_campaign, summarize
from fuzz.harness import JobConfig
from kernel_emu.canaries import Canaries, canaries_for
from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

SEEDS = Path(__file__).parent.parent / "corpus" / "seeds"
UNATTRIBUTED = "unattributed"
BUCKET_INPUTS = 20  # inputs of one bucket booted again to tell which bug it is
STOP_SLACK = 3.0  # a trial that ended this much before its time was stopped


@dataclass
class Trial:
    kernel: str
    index: int
    seconds: float
    execs: int
    # bug -> seconds into the trial (None: never)
    reached: dict[str, float | None]
    triggered: dict[str, float | None]
    bucketed: dict[str, float | None]
    # bucket signature -> the bugs its inputs trigger ([] : unattributed)
    buckets: dict[str, list[str]] = field(default_factory=dict)
    # the campaign ran its full time (not stopped by Ctrl-C or a signal)
    complete: bool = True


def attribute(summary: CampaignSummary, executor: Executor, canaries: Canaries | None,
              expected: dict[str, str] | None = None
              ) -> dict[str, tuple[list[str], float | None]]:
    """The campaign's findings as the farm's triage buckets them, and the planted bug(s) each
    bucket is, with when it was first found.

    Triage boots each finding again with every oracle and files it under the signature it
    gets. So here: up to BUCKET_INPUTS inputs of every job-level bucket are booted again, as
    triage boots them, and grouped by the signature they get. An input often triggers more
    than one bug (an entry point a mutation moved on the way, say), so a bucket is the bug
    all its inputs trigger; when they share several, one whose `expected` class (the
    profile's, after BUGS.md) is the bucket's, then the one triggered in the fewest buckets
    of the trial (the most specific), then the first to trigger; when they share none, the
    bugs each triggers first, the most frequent first: a bucket a reviewer would split; none
    at all: a finding no planted bug explains."""
    inputs: dict[str, list[tuple[str, ...]]] = {}
    first: dict[str, float | None] = {}
    for bucket in summary.buckets:
        paths = [bucket.reproducer] + [
            p for p in sorted(bucket.reproducer.parent.glob("*.elf"))
            if p != bucket.reproducer][:BUCKET_INPUTS - 1]
        when = summary.first_seen.get(bucket.signature)
        for path in paths:
            try:
                result = executor.run(path.read_bytes())
            except (OSError, HarnessError):
                continue
            if result.verdict != "crash" or not result.signature:
                continue
            triggered = canaries.state(canaries.raw(executor.machine)).triggered \
                if canaries is not None else ()
            inputs.setdefault(result.signature, []).append(triggered)
            was = first.get(result.signature)
            first[result.signature] = was if when is None else \
                when if was is None else min(was, when)
    return {signature: (bugs, first[signature])
            for signature, bugs in bucket_bugs(inputs, expected).items()}


def bucket_bugs(inputs: dict[str, list[tuple[str, ...]]],
                expected: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Signature -> the planted bug(s) it is, from the bugs each of its inputs triggered (in
    trigger order), as `attribute` says; `expected`: bug -> the class it shows."""
    expected = expected or {}
    # in how many buckets each bug is triggered at all: a bug many inputs trigger on the way
    # (an entry point a mutation moved) explains little of any one bucket
    spread = Counter(bug for seen in inputs.values() for bug in {b for bugs in seen for b in bugs})
    out: dict[str, list[str]] = {}
    for signature, seen in inputs.items():
        seen = [bugs for bugs in seen if bugs]
        if not seen:
            out[signature] = []
            continue
        common = [bug for bug in seen[0] if all(bug in other for other in seen[1:])]
        if common:  # the root cause is one all share: of the bucket's class, found in the
            # fewest buckets, the first of them to trigger
            cls = signature.split(" | ", 1)[0]
            out[signature] = [min(common, key=lambda bug: (expected.get(bug, cls) != cls,
                                                           spread[bug], common.index(bug)))]
            continue
        counts = Counter(bugs[0] for bugs in seen)
        out[signature] = [bug for bug, _ in counts.most_common()]
    return out


def run_trial(kernel: str, index: int, seconds: float, jobs: int, out: Path) -> Trial:
    config = JobConfig(kernel=kernel, out=str(out), seeds=[str(SEEDS)], seconds=seconds,
                       seed=1000 * index, canaries=True)
    summary = run_campaign(config, jobs, live=False, stream=io.StringIO())
    return judge_trial(kernel, index, seconds, summary)


def judge_trial(kernel: str, index: int, seconds: float, summary: CampaignSummary) -> Trial:
    """The Trial a finished campaign makes: its findings bucketed as triage buckets them, and
    the planted bugs they are."""
    profile = load_profile(kernel)
    executor = Executor(profile)
    canaries = canaries_for(profile, executor.image)
    layout = profile.canaries
    triaged = attribute(summary, executor, canaries,
                        dict(zip(layout.names, layout.classes, strict=False)))
    buckets = {signature: bugs for signature, (bugs, _) in triaged.items()}
    names = list(profile.canaries.names)
    bucketed: dict[str, float | None] = {name: None for name in names}
    for bugs, when in triaged.values():
        for bug in bugs or [UNATTRIBUTED]:
            if when is not None:
                was = bucketed.get(bug)
                bucketed[bug] = when if was is None else min(was, when)
    reached = {n: summary.canaries.get(n, (None, None))[0] for n in names}
    triggered = {n: summary.canaries.get(n, (None, None))[1] for n in names}
    return Trial(kernel, index, seconds, summary.execs, reached, triggered, bucketed, buckets,
                 complete=summary.seconds >= seconds - STOP_SLACK)


# ------------------------------------------------------------------------------------------
# Kaplan–Meier

def survival(times: list[float | None], horizon: float) -> list[tuple[float, float]]:
    """The Kaplan–Meier estimate of "not yet found" over [0, horizon]: (time, survival) at
    each event, starting at (0, 1). None is a trial censored at the horizon."""
    events = sorted(t for t in times if t is not None and t <= horizon)
    at_risk = len(times)
    curve = [(0.0, 1.0)]
    s = 1.0
    i = 0
    while i < len(events):
        t = events[i]
        deaths = 0
        while i < len(events) and events[i] == t:
            deaths += 1
            i += 1
        s *= 1 - deaths / at_risk
        at_risk -= deaths
        curve.append((t, s))
    return curve


def km_median(curve: list[tuple[float, float]]) -> float | None:
    """The first time survival falls to one half or below; None if it never does."""
    return next((t for t, s in curve if s <= 0.5), None)


# ------------------------------------------------------------------------------------------
# report

@dataclass
class BugRow:
    bug: str
    reached: int
    triggered: int
    bucketed: int
    median_seconds: float | None
    buckets_per_bug: float | None
    merges_needed: int


def rows(trials: list[Trial], names: list[str]) -> list[BugRow]:
    out = []
    horizon = max((t.seconds for t in trials), default=0.0)
    for bug in names:
        counts = [sum(1 for b in t.buckets.values()
                      if (not b if bug == UNATTRIBUTED else bug in b)) for t in trials]
        found = [c for c in counts if c]
        curve = survival([t.bucketed.get(bug) for t in trials], horizon)
        out.append(BugRow(
            bug,
            reached=sum(t.reached.get(bug) is not None for t in trials),
            triggered=sum(t.triggered.get(bug) is not None for t in trials),
            bucketed=sum(t.bucketed.get(bug) is not None for t in trials),
            median_seconds=km_median(curve),
            buckets_per_bug=statistics.mean(found) if found else None,
            merges_needed=sum(c - 1 for c in found)))
    return out


def table(kernel: str, trials: list[Trial], names: list[str]) -> str:
    lines = [f"{kernel}: {len(trials)} trials of {trials[0].seconds:.0f} s"
             if trials else f"{kernel}: no trials"]
    if not trials:
        return "\n".join(lines)
    lines.append(f"  {'bug':<8} {'reached':>8} {'triggered':>10} {'bucketed':>9} "
                 f"{'median s (KM)':>14} {'buckets/bug':>12}")
    bug_rows = rows(trials, names)
    for row in bug_rows:
        median = f"{row.median_seconds:.1f}" if row.median_seconds is not None else \
            f">{trials[0].seconds:.0f}"
        per = f"{row.buckets_per_bug:.2f}" if row.buckets_per_bug is not None else "-"
        n = len(trials)
        lines.append(f"  {row.bug:<8} {row.reached:>5}/{n:<2} {row.triggered:>7}/{n:<2} "
                     f"{row.bucketed:>6}/{n:<2} {median:>14} {per:>12}")
    unattributed = [sum(1 for b in t.buckets.values() if not b) for t in trials]
    splits = sum(1 for t in trials for b in t.buckets.values() if len(b) > 1)
    merges = sum(r.merges_needed for r in bug_rows)
    lines.append(f"  buckets that are no planted bug: {sum(unattributed)} over all trials "
                 f"(per trial: {', '.join(map(str, unattributed))})")
    lines.append(f"  a reviewer would have merged {merges} and split {splits} bucket(s)")
    execs = statistics.median(t.execs / t.seconds for t in trials)
    lines.append(f"  median execs/s per trial: {execs:,.0f}")
    return "\n".join(lines)


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def survival_svg(kernel: str, trials: list[Trial], names: list[str]) -> str:
    """Step curves of "not yet bucketed" per bug, one colour each, over the trial length."""
    width, height, left, bottom, top, right = 720, 420, 60, 40, 30, 150
    horizon = max((t.seconds for t in trials), default=1.0) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        # a logarithmic time axis from 0.1 s: bugs found in the first second stay apart
        return left + plot_w * math.log10(max(t, 0.1) / 0.1) / math.log10(horizon / 0.1)

    def y(s: float) -> float:
        return top + plot_h * (1 - s)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="18" font-size="13">{kernel}: share of {len(trials)} '
             f'trials that have not bucketed the bug yet (Kaplan–Meier)</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
             f'stroke="#999"/>']
    for s in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 8}" y="{y(s) + 4:.1f}" text-anchor="end">{s:g}</text>')
    tick = 0.1
    while tick <= horizon * 1.0001:
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top + plot_h}" x2="{x(tick):.1f}" '
                     f'y2="{top + plot_h + 4}" stroke="#999"/>'
                     f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{tick:g} s</text>')
        tick *= 10
    for i, bug in enumerate(names):
        curve = survival([t.bucketed.get(bug) for t in trials], horizon)
        colour = _COLOURS[i % len(_COLOURS)]
        points = [(x(0.0), y(1.0))]
        for t, s in curve[1:]:
            points += [(x(t), points[-1][1]), (x(t), y(s))]
        points.append((x(horizon), points[-1][1]))
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.5"/>')
        ly = top + 14 * i + 6
        parts.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" '
                     f'y2="{ly}" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{width - right + 38}" y="{ly + 4}">{bug}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def bench_bugs(kernels: list[str], trials: int, seconds: float, jobs: int, out: Path,
               say: Any = print) -> int:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Trial]] = {k: [] for k in kernels}
    names_of = {k: list(load_profile(k).canaries.names) for k in kernels}
    say(f"bench bugs: {', '.join(kernels)}; {trials} trials of {seconds:.0f} s each, {jobs} "
        f"job(s); results in {out}", flush=True)
    for kernel in kernels:
        for index in range(trials):
            started = time.monotonic()
            trial = run_trial(kernel, index, seconds, jobs, out / "trials" / f"{kernel}-{index}")
            if not trial.complete:
                # stopped (Ctrl-C reaches the campaign first): what was measured is kept
                _write(out, results, names_of)
                say(f"stopped during {kernel} trial {index + 1}; the finished trials are in "
                    f"{out / 'bugs.json'}", flush=True)
                return 130
            results[kernel].append(trial)
            found = sorted(b for b, t in trial.bucketed.items() if t is not None)
            say(f"  {kernel} trial {index + 1}/{trials}: {len(trial.buckets)} bucket(s), "
                f"bugs bucketed: {', '.join(found) or 'none'} "
                f"({time.monotonic() - started:.0f} s)", flush=True)
            _write(out, results, names_of)
    for kernel in kernels:
        say("\n" + table(kernel, results[kernel], names_of[kernel] + [UNATTRIBUTED]),
            flush=True)
        if results[kernel]:
            svg = out / f"survival-{kernel}.svg"
            svg.write_text(survival_svg(kernel, results[kernel], names_of[kernel]))
            say(f"  survival curves: {svg}", flush=True)
    say(f"results: {out / 'bugs.json'}", flush=True)
    return 0


def rebucket(source: Path, out: Path, say: Any = print) -> int:
    """The trials of an earlier `bench bugs` run (SOURCE/bugs.json and SOURCE/trials), judged
    again by this checkout: their campaigns' findings booted again and bucketed with today's
    oracles and signatures, without fuzzing again. What the campaigns found, and when, stays
    theirs; the buckets, the attribution and the table are this checkout's."""
    try:
        earlier = json.loads((source / "bugs.json").read_text())
        if not isinstance(earlier, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("trials"), list)
                for v in earlier.values()):
            raise ValueError("not the results of fuzzfarm bench bugs")
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: no bench bugs results to bucket again ({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Trial]] = {}
    names_of: dict[str, list[str]] = {}
    for kernel, data in earlier.items():
        names_of[kernel] = list(load_profile(kernel).canaries.names)
        results[kernel] = []
        for old in data.get("trials", []):
            folder = source / "trials" / f"{kernel}-{old['index']}"
            jobs = len(list((folder / "jobs").glob("job-*.json")))
            if not jobs:
                say(f"  {kernel} trial {old['index'] + 1}: {folder} holds no campaign, left "
                    f"out", flush=True)
                continue
            summary = summarize(folder, jobs, old["seconds"])
            trial = judge_trial(kernel, old["index"], old["seconds"], summary)
            trial.complete = old.get("complete", True)
            results[kernel].append(trial)
            say(f"  {kernel} trial {old['index'] + 1}: {len(trial.buckets)} bucket(s) "
                f"(were {len(old.get('buckets', {}))})", flush=True)
            _write(out, results, names_of)
    for kernel, trials in results.items():
        say("\n" + table(kernel, trials, names_of[kernel] + [UNATTRIBUTED]), flush=True)
        if trials:
            svg = out / f"survival-{kernel}.svg"
            svg.write_text(survival_svg(kernel, trials, names_of[kernel]))
            say(f"  survival curves: {svg}", flush=True)
    say(f"results: {out / 'bugs.json'}", flush=True)
    return 0


def _write(out: Path, results: dict[str, list[Trial]], names: dict[str, list[str]]) -> None:
    data = {kernel: {"bugs": [asdict(r) for r in rows(trials, names[kernel] + [UNATTRIBUTED])],
                     "trials": [asdict(t) for t in trials]}
            for kernel, trials in results.items()}
    tmp = out / "bugs.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out / "bugs.json")
