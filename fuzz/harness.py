"""One fuzzing job: a libFuzzer campaign (through Atheris) over the emulated boot.

A job runs in a process of its own (``python -m fuzz.harness CONFIG``) because libFuzzer ends
its process with ``exit()``. The job decides when to stop (time, runs, or a stop signal), so it
can write its last statistics first; libFuzzer's own limits are only a backstop.

What the fuzzer learns from is the guest: edge coverage and compare operands of the kernel run
after the snapshot (see :mod:`fuzz.feedback`). The harness's own Python is not instrumented.

A kernel crash is recorded (input + Result, one folder per signature) and fuzzing goes on; a
hang is the instruction budget's verdict, not libFuzzer's timeout. An exception in our own code
is a *harness error*: written apart, never counted as a finding, and the executor is rebuilt.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fuzz.feedback import Feedback, LibFuzzer, make_feedback
from fuzz.solutions import Solutions, bucket_id, write_atomic
from kernel_emu import causes
from kernel_emu.canaries import canaries_for
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.result import Result, run_ending

STATS_INTERVAL = 1.0
FINISH_WAIT = 15.0  # how long an ending job waits for room to write what it still holds
# inputs slower than this (e.g. ones that fill the 16 MiB heap) are listed in the statistics,
# so that a farm does not hand them to every later job as seeds
SLOW_INPUT = 0.02
SLOW_INPUTS_KEPT = 20_000
# A run that writes no new page for this many instructions (and is not in memset/memcpy) is
# stopped as stalled: a hang costs a few milliseconds instead of the profile's whole budget
# (~1 s or more), while a legitimate load of 16 MiB of segments (millions of instructions)
# runs to its end. A stalled run is confirmed once per signature with the profile's budget and
# no watchdog. A run the cycle search proves to be in an exact cycle is not stopped: it goes
# on to that budget by whole periods (JobConfig.cycles_to_budget), and needs no confirming.
# Every checkpoint stops the guest (and, inside a block, makes it translate that block twice
# over): at 200,000 a late campaign's runs into ring 3 made ~3 each, 120-170 µs of ~1 ms, and
# 0.1% of its runs were stopped as stalled, all of them runs that then finished under the
# budget (docs/performance.md).
WATCHDOG = 500_000
# libFuzzer's timeout only guards against a bug of ours: the guest's hangs end on the budget
LIBFUZZER_TIMEOUT = 300
# crashes waiting to be judged between runs (Job.defer_findings); past this many (libFuzzer
# runs a corpus without mutating between its inputs) they are judged at once
PENDING_CAP = 256


@dataclass
class JobConfig:
    kernel: str
    out: str
    job: int = 0
    seeds: list[str] = field(default_factory=list)
    seconds: float | None = None
    runs: int | None = None
    coverage: bool = True
    compares: bool = True
    mutator: bool = True
    native: bool = True
    seed: int = 0
    max_len: int = 16384
    rss_limit_mb: int = 2048
    # hit counts as features (libFuzzer -use_counters): they pull the corpus towards inputs
    # with ever more segments, each slower to boot, for little new behaviour of the loader
    counters: bool = False
    watchdog: int = WATCHDOG
    # end the job once a finding of this class ("class" or "class:field") is seen
    stop_on: str | None = None
    # memset/memcpy bulk moves performed natively, and exact cycles skipped by whole periods
    # under the watchdog (same results either way; off to measure or compare)
    fast_routines: bool = True
    skip_cycles: bool = True
    # the leaner run (kernel_emu.executor.Executor's `lean`; same results, off to measure it)
    lean: bool = True
    # instructions counted per translated block (Executor's `count_blocks`; same results)
    count_blocks: bool = True
    # a run proven to be in an exact cycle goes on to the profile's budget by whole periods
    # (Executor's `cycles_to_budget`): filed as the budget files it, with no second boot to
    # confirm it. Off: the watchdog stops it, and the job confirms it with the full budget
    cycles_to_budget: bool = True
    # for benchmarks only: record when each planted bug's canary (the profile's [canaries])
    # was first reached and triggered; nothing of the fuzzing depends on them
    canaries: bool = False

    def dumps(self) -> str:
        # a field at its default is left out: a checkout without it (a benchmark runs
        # another checkout's jobs side by side) reads the same configuration
        defaults = JobConfig(kernel=self.kernel, out=self.out)
        return json.dumps({k: v for k, v in asdict(self).items()
                           if k in ("kernel", "out") or v != getattr(defaults, k)})

    @classmethod
    def loads(cls, text: str) -> JobConfig:
        return cls(**json.loads(text))


@dataclass
class FindingStats:
    crash_class: str
    bucket: str
    count: int = 0
    first_exec: int = 0
    first_seconds: float = 0.0
    smallest: int = 0


@dataclass
class JobStats:
    job: int
    kernel: str
    pid: int
    started: float = 0.0
    updated: float = 0.0
    execs: int = 0
    edges: int = 0
    compares: int = 0
    harness_errors: int = 0
    # files the job could not write (a full disk, say): ours, never the kernel's; what could
    # not be written is kept and written again once there is room
    write_errors: int = 0
    last_write_error: str = ""
    skipped: int = 0
    slow: int = 0  # stalled under the watchdog, but finished under the profile's budget
    seconds: dict[str, float] = field(default_factory=dict)  # where the job's time went
    done: bool = False
    stop_reason: str = ""
    notes: list[str] = field(default_factory=list)
    findings: dict[str, FindingStats] = field(default_factory=dict)
    slow_inputs: list[str] = field(default_factory=list)  # sha256 of inputs over SLOW_INPUT
    # class, and class:field, -> (exec, seconds) of its first sighting, as cause or consequence
    first_class: dict[str, tuple[int, float]] = field(default_factory=dict)
    # with JobConfig.canaries: planted bug -> seconds when first reached, first triggered
    # (None: not yet)
    canaries: dict[str, list[float | None]] = field(default_factory=dict)
    # how runs ended (kernel_emu.result.RUN_ENDINGS) -> [runs, seconds booting and judging
    # them, of which prepare, guest, oracles]: where the job's run time goes, by kind of run
    run_endings: dict[str, list[float]] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return max(self.updated - self.started, 0.0) if self.started else 0.0

    def to_json(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict: that deep copy took ~3 ms a flush, and a job
        # flushes every second and after every slow input
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(seconds=dict(self.seconds), notes=list(self.notes),
                    findings={k: vars(v).copy() for k, v in self.findings.items()},
                    slow_inputs=list(self.slow_inputs),
                    first_class={k: list(v) for k, v in self.first_class.items()},
                    canaries={k: list(v) for k, v in self.canaries.items()},
                    run_endings={k: list(v) for k, v in self.run_endings.items()},
                    elapsed=self.elapsed)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobStats:
        data = dict(data)
        data.pop("elapsed", None)
        findings = {k: FindingStats(**v) for k, v in data.pop("findings", {}).items()}
        first = {k: (int(v[0]), float(v[1])) for k, v in data.pop("first_class", {}).items()}
        return cls(**data, findings=findings, first_class=first)


def count_run(endings: dict[str, list[float]], name: str, took: float,
              phases: Mapping[str, float], before: tuple[float, float, float]) -> None:
    """Add a run that ended as `name` (kernel_emu.result.run_ending) to `endings` (as
    JobStats.run_endings holds them): its seconds `took`, and its share of the executor's
    `phases`, which stood at `before` (prepare, guest, oracles) when it started."""
    row = endings.get(name)
    if row is None:
        row = endings[name] = [0, 0.0, 0.0, 0.0, 0.0]
    row[0] += 1
    row[1] += took
    row[2] += phases["prepare"] - before[0]
    row[3] += phases["guest"] - before[1]
    row[4] += phases["oracles"] - before[2]


def _class_keys(finding: Any) -> list[str]:
    """How a finding counts among the classes first seen: its class, and class:field."""
    return [finding.cls] + ([f"{finding.cls}:{finding.field}"] if finding.field else [])


def stats_path(out: Path, job: int) -> Path:
    return out / "jobs" / f"job-{job}.json"


class Job:
    """The state behind libFuzzer's callbacks."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.profile = load_profile(config.kernel)
        self.solutions = Solutions(self.out)
        self.stats = JobStats(config.job, config.kernel, os.getpid())
        self.feedback: Feedback = make_feedback(config.native)
        self.executor = self._new_executor()
        self.stats.notes = list(self.executor.notes)
        self._libfuzzer_connected = False
        self._stop_signal = 0
        self._last_flush = 0.0
        self._slow_unwritten = False  # a slow input not yet in the statistics file
        self._mutator: Any = None
        self._mutator_seconds = 0.0
        self._confirm_seconds = 0.0  # on the confirming executor: hangs confirmed, causes judged
        self._confirmer: Executor | None = None
        self._unconfirmed: set[str] = set()  # hang signatures the full budget did not confirm
        self._seen: set[str] = set()  # signatures as the executor gives them, seen before
        # signature -> header field -> what the kernel did with it put right (None: it
        # crashed the same way), as causes.attribute keeps it
        self._causes: dict[str, dict[str, str | None]] = {}
        # findings of runs libFuzzer timed, judged at its next call to the mutator (see
        # `defer_findings`): (input, result, when, exec number, whether the watchdog stopped it)
        self._pending: list[tuple[bytes, Any, float, int, bool]] = []
        # libFuzzer times each input's callback and, with -entropic_scale_per_exec_time,
        # mutates an input the less the slower it ran. What the job does beyond the run (a
        # hang confirmed, a cause judged, a new bucket written: boots and files, milliseconds)
        # is not the kernel's cost of the input, so with a mutator of the job's (called
        # between runs, outside the timing) it is done there, not in the callback. Off: at once
        self.defer_findings = False
        # signature -> its reproducer (signature and sha256 -> an input kept beside it)
        self._unwritten: dict[str, tuple[bytes, Any]] = {}
        self._canaries = canaries_for(self.profile, self.executor.image) \
            if config.canaries else None
        self._canary_flags = 0  # every flag seen so far

    def _new_executor(self) -> Executor:
        # no second run to name who wrote a damaged heap header (Executor.explain): jobs and
        # triage file findings under the same signature. A cause in the input is judged
        # once per signature and field (`_with_cause`), not for every run. A run with
        # nothing to report leaves only its verdict here: no backtrace, no heap blocks
        executor = Executor(self.profile, native=self.config.native, details=False,
                            coverage=self.config.coverage, watchdog=self.config.watchdog or None,
                            fast_routines=self.config.fast_routines,
                            skip_cycles=self.config.skip_cycles, explain=False,
                            lean=self.config.lean, count_blocks=self.config.count_blocks,
                            causes=False, cycles_to_budget=self.config.cycles_to_budget)
        if self.config.compares:
            executor.add_machine_hook(self.feedback.attach)
        return executor

    # libFuzzer callbacks -----------------------------------------------------------------
    def test_one_input(self, data: bytes) -> None:
        if not self._libfuzzer_connected:
            try:
                self._connect()
            except Exception as e:  # noqa: BLE001 - without feedback the job is pointless
                self.stats.notes.append(f"harness error: cannot connect to libFuzzer: {e}")
                self.stats.harness_errors += 1
                self.finish("harness-error", status=3)
        now = time.monotonic()
        self.run_input(data, now)
        self.stats.execs += 1
        if self._stop_signal:
            self.finish(f"signal {self._stop_signal}")
        cfg = self.config
        if cfg.stop_on is not None and cfg.stop_on in self.stats.first_class:
            self.finish("found")
        if cfg.runs is not None and self.stats.execs >= cfg.runs:
            self.finish("runs")
        if cfg.seconds is not None and now - self.stats.started >= cfg.seconds:
            self.finish("time")
        if now - self._last_flush >= STATS_INTERVAL or self._slow_unwritten:
            self.flush(now)

    def _connect(self) -> None:
        libfuzzer = LibFuzzer()
        if self.config.coverage:
            self.feedback.connect(libfuzzer, compares=self.config.compares)
        self._libfuzzer_connected = True
        self.stats.started = time.monotonic()

    def run_input(self, data: bytes, now: float | None = None) -> None:
        """Boot `data` and record what it found (`now`: when, on the monotonic clock). The
        farm's own failure is recorded as a harness error, never raised."""
        if now is None:
            now = time.monotonic()
        try:
            phases = self.executor.phase_seconds
            before = (phases["prepare"], phases["guest"], phases["oracles"])
            started = time.perf_counter()
            result = self.executor.run(data)
            took = time.perf_counter() - started
            self._count_ending(result, took, before)
            if took > SLOW_INPUT and len(self.stats.slow_inputs) < SLOW_INPUTS_KEPT:
                self.stats.slow_inputs.append(hashlib.sha256(data).hexdigest())
                # in the statistics before libFuzzer may write the input to its corpus, where
                # a farm slice reading both keeps it out of the shared corpus
                self._slow_unwritten = True
        except InputError:
            self.stats.skipped += 1  # e.g. larger than the ramdisk: nothing the kernel can see
            return
        except Exception as e:  # noqa: BLE001 - our failure, whatever it is, is not the kernel's
            self._harness_error(data, e, rebuild=True)
            return
        if self.config.coverage:
            tracer = self.executor.tracer
            self.feedback.collect(tracer.coverage(), tracer.coverage_lines())
        if self._canaries is not None:
            self._record_canaries(now)
        if result.verdict == "crash" and result.signature:
            stalled = bool(self.executor.stalled_at)
            if self.defer_findings and len(self._pending) < PENDING_CAP:
                self._pending.append((data, result, now, self.stats.execs + 1, stalled))
            else:
                self._finding(data, result, now, self.stats.execs + 1, stalled)

    def _count_ending(self, result: Result, took: float,
                      before: tuple[float, float, float]) -> None:
        """Count the run that just ended, and its time (`took`, and the executor's phases,
        `before` it), by how it ended."""
        count_run(self.stats.run_endings,
                  run_ending(result.stop, result.verdict, bool(self.executor.stalled_at)),
                  took, self.executor.phase_seconds, before)

    def judge_pending(self) -> None:
        """Record the findings of the runs since the last call (`defer_findings`)."""
        while self._pending:
            data, result, now, exec_no, stalled = self._pending.pop(0)
            try:
                self._finding(data, result, now, exec_no, stalled)
            except Exception as e:  # noqa: BLE001 - ours; the next findings still count
                self._harness_error(data, e)

    def _record_canaries(self, now: float) -> None:
        canaries = self._canaries
        assert canaries is not None
        flags = canaries.raw(self.executor.machine) & canaries.flag_mask
        if not flags & ~self._canary_flags:
            return
        self._canary_flags |= flags
        state = canaries.state(flags)
        when = now - self.stats.started
        for name in canaries.names:
            seen = self.stats.canaries.setdefault(name, [None, None])
            if name in state.reached and seen[0] is None:
                seen[0] = when
            if name in state.triggered and seen[1] is None:
                seen[1] = when

    def _finding(self, data: bytes, result: Any, now: float, exec_no: int, stalled: bool) -> None:
        """Record a crash found by run number `exec_no` at `now` (`stalled`: the watchdog
        stopped that run)."""
        sig = result.signature
        # the watchdog ended this run early: only the profile's own budget can say what the
        # run really comes to (a hang, something else, or nothing)
        if stalled:
            if sig in self._unconfirmed:
                self.stats.slow += 1
                return
            first = sig not in self._seen
            # a first stalled signature; or an input whose header the job will judge for a
            # cause, which it must judge against what the profile's budget makes of it, as
            # triage does (the watchdog stops some hangs in another function of their loop)
            if first or causes.broken_fields(data):
                confirmed = self._confirm(data)
                if confirmed is None or confirmed.signature != sig:
                    if first:
                        self._unconfirmed.add(sig)
                    self.stats.slow += 1
                    if confirmed is not None and confirmed.verdict == "crash":
                        # a slow input's real crash
                        self._finding(data, confirmed, now, exec_no, False)
                    return
                result = confirmed
        self._seen.add(sig)
        raw = result
        result, borrowed = self._with_cause(data, raw)
        sig = result.signature
        entry = self.stats.findings.get(sig)
        if borrowed and (entry is None or len(data) < entry.smallest or self._new_class(result)):
            # an input the job writes is judged as triage will judge it: itself booted with
            # each field put right, not by what another input of its signature showed
            result, _ = self._with_cause(data, raw, exact=True)
            sig = result.signature
            entry = self.stats.findings.get(sig)
        if entry is None:
            entry = FindingStats(result.crash_class or "?", bucket_id(sig),
                                 first_exec=exec_no,
                                 first_seconds=now - self.stats.started)
            self.stats.findings[sig] = entry
        entry.count += 1
        first_sighting = False
        for finding in result.findings:  # consequences too: when was each class first seen
            for key in _class_keys(finding):
                if key not in self.stats.first_class:
                    self.stats.first_class[key] = (exec_no,
                                                   now - self.stats.started)
                    first_sighting = True
        # A new bucket is written at once. A smaller reproducer of a known one, or the
        # evidence of a class first seen, waits for the next flush (at most STATS_INTERVAL):
        # a job shrinks its reproducers hundreds of times a minute, and writing each one
        # cost ~1.5 ms. A job killed meanwhile keeps the bucket's earlier reproducer.
        if entry.smallest == 0 or len(data) < entry.smallest:
            fresh = entry.smallest == 0
            entry.smallest = len(data)
            self._unwritten[sig] = (data, result)
            if fresh:
                self.flush(now)
        elif first_sighting:
            # not the bucket's smallest, but the evidence of a class (or field) seen for the
            # first time: kept beside it, so what the statistics say was found can be shown
            self._unwritten[f"{sig}\0{hashlib.sha256(data).hexdigest()}"] = (data, result)

    def _confirm(self, data: bytes) -> Any:
        """The Result of `data` with the profile's budget and no watchdog (None on failure)."""
        try:
            return self._full_budget(data)
        except Exception as e:  # noqa: BLE001
            self._confirmer = None
            self._harness_error(data, e)
            return None

    def _full_budget(self, data: bytes) -> Any:
        if self._confirmer is None:
            self._confirmer = Executor(self.profile, native=self.config.native,
                                       fast_routines=self.config.fast_routines,
                                       explain=False, lean=self.config.lean, causes=False)
        start = time.perf_counter()
        try:
            return self._confirmer.run(data)
        finally:
            self._confirm_seconds += time.perf_counter() - start

    def _with_cause(self, data: bytes, result: Any, exact: bool = False) -> tuple[Any, bool]:
        """`result` filed under its cause in the input, as triage files it (Executor's
        `causes`), and whether another input judged a field of it (as the cause or not).
        What putting a field right does is judged once per signature and field (`exact`:
        every field again, for this input): the first input of each is booted again with it
        put right, on the confirming executor (the profile's budget; this job's executor
        and its feedback left alone)."""
        if result.signature is None:
            return result, False
        known = None if exact else self._causes.setdefault(result.signature, {})
        judged = set(known or ())
        try:
            filed, _, _ = causes.attribute(data, result, self._full_budget, known)
            return filed, bool(judged) and any(f.name in judged
                                               for f in causes.broken_fields(data))
        except Exception as e:  # noqa: BLE001 - ours: the crash keeps its own signature
            self._confirmer = None
            self._harness_error(data, e)
            return result, False

    def _new_class(self, result: Any) -> bool:
        """Whether `result` has a class (or class and field) the job has not seen yet."""
        return any(key not in self.stats.first_class for f in result.findings
                   for key in _class_keys(f))

    def _harness_error(self, data: bytes, error: BaseException, rebuild: bool = False) -> None:
        self.stats.harness_errors += 1
        kind = "harness error" if isinstance(error, HarnessError) else "internal error"
        try:
            self.solutions.record_error(data, f"{kind}: {type(error).__name__}: {error}",
                                        traceback.format_exc())
        except OSError as e:  # counted in the statistics all the same
            self._write_failed(e)
        if rebuild:  # the machine may be in any state now: start again from a fresh one
            self.executor = self._new_executor()

    # mutator -----------------------------------------------------------------------------
    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        self.judge_pending()
        start = time.perf_counter()
        try:
            return self._get_mutator().mutate(data, max_size, seed)
        except Exception as e:  # noqa: BLE001
            self._harness_error(data, e)
            return atheris.Mutate(data, max_size)
        finally:
            self._mutator_seconds += time.perf_counter() - start

    def crossover(self, a: bytes, b: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        self.judge_pending()
        try:
            return self._get_mutator().crossover(a, b, max_size, seed)
        except Exception as e:  # noqa: BLE001
            self._harness_error(a, e)
            return atheris.Mutate(a, max_size)

    def _get_mutator(self) -> Any:
        if self._mutator is None:
            import atheris

            from fuzz.facts import facts_for
            from fuzz.mutator import ElfMutator

            facts = facts_for(self.executor.profile, self.executor.image)
            # looked up at call time: Fuzz() replaces atheris.Mutate once it starts
            self._mutator = ElfMutator(lambda d, n: atheris.Mutate(d, n), seed=self.config.seed,
                                       facts=facts)
        return self._mutator

    # stopping ----------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_flush = now
        self._slow_unwritten = False
        self.stats.updated = now
        self.stats.edges = self.feedback.edges
        self.stats.compares = self.feedback.compares
        self.stats.seconds = {**{k: round(v, 3) for k, v in self.executor.phase_seconds.items()},
                              "mutator": round(self._mutator_seconds, 3),
                              "confirm": round(self._confirm_seconds, 3)}
        self._write_solutions()
        try:
            write_atomic(stats_path(self.out, self.config.job),
                         json.dumps(self.stats.to_json()).encode())
        except OSError as e:  # the next flush writes them, with this failure counted
            self._write_failed(e)

    def _write_solutions(self) -> None:
        """Store the reproducers not yet on disk; any that cannot be (the disk full, say)
        stay in memory for the next flush: a finding is never dropped for want of room."""
        for sig, (data, result) in list(self._unwritten.items()):
            try:
                self.solutions.record(data, result)
            except OSError as e:
                self._write_failed(e)
                return
            del self._unwritten[sig]

    def _write_failed(self, error: OSError) -> None:
        self.stats.write_errors += 1
        self.stats.last_write_error = f"{type(error).__name__}: {error}"[:300]

    def finish(self, reason: str, status: int = 0) -> None:
        self.judge_pending()
        self.stats.done = True
        self.stats.stop_reason = reason
        self.flush()
        # what could not be written yet (a full disk) is worth waiting a little for room
        deadline = time.monotonic() + FINISH_WAIT
        while (self._unwritten or not self._stats_written()) and time.monotonic() < deadline:
            time.sleep(0.5)
            self.flush()
        if self._unwritten:
            print(f"fuzzfarm job: {len(self._unwritten)} crashing input(s) could not be "
                  f"written: {self.stats.last_write_error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # libFuzzer's exit path would not return to Python anyway


    def _stats_written(self) -> bool:
        try:
            written = json.loads(stats_path(self.out, self.config.job).read_text())
        except (OSError, ValueError):
            return False
        return bool(written.get("done")) and written.get("execs") == self.stats.execs


def libfuzzer_args(config: JobConfig) -> list[str]:
    out = Path(config.out)
    args = [
        "fuzzfarm-job",
        f"-seed={config.seed or 1 + config.job}",
        f"-max_len={config.max_len}",
        f"-timeout={LIBFUZZER_TIMEOUT}",
        f"-rss_limit_mb={config.rss_limit_mb}",
        "-handle_int=0",
        "-handle_term=0",
        "-reload=1",
        "-print_final_stats=0",
        f"-use_counters={int(config.counters)}",
        # a corpus entry that loads 16 MiB costs ~100 ms; favour fast entries' mutations
        "-entropic_scale_per_exec_time=1",
        # without coverage feedback libFuzzer would drop every seed after the first run
        f"-keep_seed={0 if config.coverage else 1}",
        f"-artifact_prefix={out / 'jobs' / f'job-{config.job}-'}",
    ]
    if config.seconds is not None:
        args.append(f"-max_total_time={int(config.seconds) + 60}")
    args.append(str(out / "corpus"))
    args.extend(config.seeds)
    return args


# glibc picks its string functions for the CPU when a process starts. On a Xeon with AVX-512
# its 512-bit memset wrote 17-24 GB/s where the 256-bit one it takes on CPUs that downclock
# for AVX-512 (its preference Prefer_No_AVX512) wrote 24-30, at sizes from 64 B to 1 MiB;
# runs into ring 3, which clear pages, TLBs and tables, took 16% less time with the
# preference set (docs/performance.md). A user's own `glibc.cpu.hwcaps` wins.
LIBC_TUNABLE = "glibc.cpu.hwcaps=Prefer_No_AVX512"


@functools.cache
def _libc_has_avx512_functions() -> bool:
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except (OSError, ValueError):
        return False
    return glibc.startswith("glibc") and " avx512f" in flags


def job_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a job process starts with: `base` (default: this process's) without
    Python-level coverage, which must not reach libFuzzer, and with glibc told to prefer its
    256-bit string functions (LIBC_TUNABLE) where the CPU has AVX-512, unless the user
    chose."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONCOVERAGE", None)
    tunables = env.get("GLIBC_TUNABLES", "")
    if _libc_has_avx512_functions() and "glibc.cpu.hwcaps" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{LIBC_TUNABLE}" if tunables else LIBC_TUNABLE
    return env


def run_job(config: JobConfig) -> None:
    """Run one job to its end; never returns (libFuzzer or the job exits the process)."""
    import atheris

    out = Path(config.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    job = Job(config)
    signal.signal(signal.SIGINT, job.on_signal)
    signal.signal(signal.SIGTERM, job.on_signal)
    job.flush()
    kwargs: dict[str, Any] = {}
    if config.mutator:
        kwargs = {"custom_mutator": job.mutate, "custom_crossover": job.crossover}
        job.defer_findings = True  # judged in the mutator, between timed runs
    atheris.Setup(libfuzzer_args(config), job.test_one_input, **kwargs)
    if config.lean:
        # what was built so far (the snapshot's pages, the image, the modules) lives as long
        # as the job: the collector need not go through it again every few runs
        gc.collect()
        gc.freeze()
    atheris.Fuzz()
    job.finish("libfuzzer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fuzz.harness CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        config = JobConfig.loads(argv[0])
    except (ValueError, TypeError) as e:
        print(f"fuzz.harness: bad job configuration: {e}", file=sys.stderr)
        return 2
    run_job(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
