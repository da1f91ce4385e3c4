"""A local campaign: N fuzzing jobs (processes) sharing one corpus directory, watched from here.

The parent starts the jobs, shows a live progress line built from their statistics files,
restarts a job that died (its death is a harness error, never a finding), forwards Ctrl-C as a
stop request, and ends with the table of findings by signature.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fuzz.harness import JobConfig, JobStats, job_environment, stats_path
from fuzz.progress import ProgressLine
from fuzz.solutions import Bucket, Solutions

POLL = 0.5
# seconds between progress lines when stderr is not a terminal
PLAIN_EVERY = 10.0
MAX_RESTARTS = 3
STOP_GRACE = 15.0


@dataclass
class CampaignSummary:
    out: Path
    seconds: float
    execs: int
    edges: int
    corpus: int
    harness_errors: int
    findings: dict[str, int]  # signature -> count
    first_seen: dict[str, float]  # signature -> seconds into the campaign
    first_class: dict[str, float]  # class (as cause or consequence) -> seconds into it
    buckets: list[Bucket]
    job_failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # with JobConfig.canaries: planted bug -> (first reached, first triggered), seconds into
    # the campaign (None: never)
    canaries: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    # the jobs' runs by how they ended: [runs, seconds, prepare, guest, oracles] (JobStats)
    run_endings: dict[str, list[float]] = field(default_factory=dict)

    rate: float = 0.0  # sum over jobs of execs / seconds fuzzing (start-up excluded)

    @property
    def execs_per_second(self) -> float:
        return self.rate

    def classes(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for bucket in self.buckets:
            counts[bucket.crash_class] += self.findings.get(bucket.signature, 0) or 1
        return counts


@dataclass
class _Job:
    config: JobConfig
    process: subprocess.Popen[bytes]
    log: TextIO
    restarts: int = 0
    finished: bool = False


def _spawn(config: JobConfig, out: Path,
           checkout: Path | None = None) -> tuple[subprocess.Popen[bytes], TextIO]:
    log = (out / "jobs" / f"job-{config.job}.log").open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "fuzz.harness", config.dumps()],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=job_environment(),
        # another checkout's job runs that checkout's code (`python -m` looks in cwd first)
        cwd=checkout,
        # the parent decides when jobs stop: a terminal's Ctrl-C reaches only the parent
        start_new_session=True,
    )
    return process, log


def read_job_stats(out: Path, job: int) -> JobStats | None:
    try:
        return JobStats.from_json(json.loads(stats_path(out, job).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_stats(out: Path, jobs: int) -> list[JobStats]:
    return [s for s in (read_job_stats(out, job) for job in range(jobs)) if s is not None]


def _corpus_size(out: Path) -> int:
    try:
        return sum(1 for e in os.scandir(out / "corpus") if e.is_file())
    except OSError:
        return 0


def summarize(out: Path, jobs: int, seconds: float) -> CampaignSummary:
    stats = read_stats(out, jobs)
    findings: Counter[str] = Counter()
    first: dict[str, float] = {}
    for s in stats:
        for sig, f in s.findings.items():
            findings[sig] += f.count
            first[sig] = min(first.get(sig, f.first_seconds), f.first_seconds)
    first_class: dict[str, float] = {}
    for s in stats:
        for cls, (_exec, when) in s.first_class.items():
            first_class[cls] = min(first_class.get(cls, when), when)
    notes = sorted({n for s in stats for n in s.notes})
    canaries: dict[str, tuple[float | None, float | None]] = {}
    for s in stats:
        for name, (reached, triggered) in s.canaries.items():
            was = canaries.get(name, (None, None))
            canaries[name] = (_earliest(was[0], reached), _earliest(was[1], triggered))
    return CampaignSummary(
        out=out, seconds=seconds, execs=sum(s.execs for s in stats),
        edges=max((s.edges for s in stats), default=0), corpus=_corpus_size(out),
        harness_errors=sum(s.harness_errors for s in stats), findings=dict(findings),
        first_seen=first, first_class=first_class, buckets=Solutions(out).buckets(), notes=notes,
        rate=sum(s.execs / s.elapsed for s in stats if s.elapsed > 0), canaries=canaries,
        run_endings=add_run_endings(s.run_endings for s in stats))


def add_run_endings(tables: Iterable[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Several jobs' or campaigns' runs by how they ended, added up."""
    total: dict[str, list[float]] = {}
    for table in tables:
        for name, row in table.items():
            was = total.get(name)
            total[name] = list(row) if was is None else \
                [a + b for a, b in zip(was, row, strict=True)]
    return total


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def progress_line(summary: CampaignSummary, total: float | None) -> str:
    by_class = summary.classes()
    found = ", ".join(f"{c} {n}" for c, n in sorted(by_class.items())) or "none"
    clock = f"{summary.seconds:5.0f}s" + (f"/{total:.0f}s" if total else "")
    line = (f"[{clock}] execs {summary.execs:,} ({summary.execs_per_second:,.0f}/s)"
            f" · edges {summary.edges} · corpus {summary.corpus} · findings: {found}")
    if summary.harness_errors:
        line += f" · harness errors {summary.harness_errors}"
    return line


def run_campaign(base: JobConfig, jobs: int, *, stream: TextIO | None = None,
                 live: bool | None = None, checkout: Path | None = None) -> CampaignSummary:
    """Run `jobs` jobs of `base` (its `job` and `seed` are set per job) to their end.

    The progress line goes to `stream` (default: stderr), live when it is a terminal or
    `live` says so, as a plain line every few seconds otherwise. `checkout`: run the jobs
    with another checkout's code (a benchmark's side-by-side; its paths must be absolute)."""
    out = Path(base.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for job in range(jobs):
        stats_path(out, job).unlink(missing_ok=True)
    status = ProgressLine(sys.stderr if stream is None else stream, live=live,
                          every=PLAIN_EVERY)
    running: list[_Job] = []
    for job in range(jobs):
        config = JobConfig(**{**base.__dict__, "job": job, "seed": base.seed + job + 1})
        process, log = _spawn(config, out, checkout)
        running.append(_Job(config, process, log))

    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGINT, request_stop)
    start = time.monotonic()
    failures: list[str] = []
    stop_sent = 0.0
    try:
        while any(not j.finished for j in running):
            time.sleep(POLL)
            now = time.monotonic()
            if stop_requested and not stop_sent:
                stop_sent = now
                for j in running:
                    if not j.finished:
                        j.process.send_signal(signal.SIGTERM)
            if stop_sent and now - stop_sent > STOP_GRACE:
                for j in running:
                    if not j.finished:
                        j.process.kill()
            for j in running:
                if j.finished or j.process.poll() is None:
                    continue
                failure = _job_failure(j, out)
                if failure and not stop_requested and j.restarts < MAX_RESTARTS:
                    failures.append(failure + "; restarted")
                    j.restarts += 1
                    j.log.close()
                    j.process, j.log = _spawn(_remaining(j.config, now - start), out,
                                                 checkout)
                    continue
                if failure:
                    failures.append(failure)
                j.finished = True
                j.log.close()
                stats = read_job_stats(out, j.config.job)
                if stats is not None and stats.stop_reason == "found":
                    stop_requested = True  # one job found what the campaign was after
            if status.due():  # the statistics files are read only for a line to be shown
                status.update(progress_line(summarize(out, jobs, now - start), base.seconds))
    finally:
        signal.signal(signal.SIGINT, previous)
        for j in running:
            if j.process.poll() is None:
                j.process.kill()
                j.process.wait()
            if not j.log.closed:
                j.log.close()
        status.close()
    summary = summarize(out, jobs, time.monotonic() - start)
    summary.job_failures = failures
    return summary


def _remaining(config: JobConfig, elapsed: float) -> JobConfig:
    seconds = None if config.seconds is None else max(config.seconds - elapsed, 1.0)
    return JobConfig(**{**config.__dict__, "seconds": seconds})


def _job_failure(job: _Job, out: Path) -> str | None:
    """Why a job that exited did not finish normally, or None if it did."""
    code = job.process.returncode
    stats = read_job_stats(out, job.config.job)
    if code == 0 and stats is not None and stats.done:
        return None
    what = {3: "could not start fuzzing", 70: "libFuzzer timeout (a run took over 300 s)",
            71: "libFuzzer out-of-memory limit", 77: "uncaught exception in the harness"}
    if code is not None and code < 0:
        reason = f"killed by signal {-code}"
    else:
        reason = what.get(code or 0, f"exit status {code}")
    return (f"harness error: job {job.config.job} stopped: {reason} "
            f"(see {out / 'jobs' / f'job-{job.config.job}.log'})")


def findings_table(summary: CampaignSummary, cwd: Path | None = None) -> str:
    cwd = cwd or Path.cwd()
    if not summary.buckets:
        return "no findings"
    rows = []
    for b in sorted(summary.buckets, key=lambda b: (b.crash_class, b.signature)):
        path = b.reproducer
        shown = path.relative_to(cwd) if path.is_relative_to(cwd) else path
        first = summary.first_seen.get(b.signature)
        rows.append((b.crash_class, str(summary.findings.get(b.signature, 0)),
                     f"{first:.1f}" if first is not None else "-", b.signature, str(shown)))
    head = ("class", "count", "first s", "signature", "reproducer")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, [*widths, 0], strict=False)).rstrip()]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]),
                                r[2].rjust(widths[2]), r[3].ljust(widths[3]), r[4]]))
    return "\n".join(lines)
