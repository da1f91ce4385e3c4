"""What the farm's tasks do, as plain functions (the Celery tasks in `tasks.py` only call these,
so tests and the command line can run them directly).

Every function is idempotent: Celery hands a task out again when its worker died before
acknowledging it, and the controller re-sends triage work that was never finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz.harness import WATCHDOG, JobConfig, JobStats, job_environment, stats_path
from fuzz.minimize import NotACrash, minimize
from fuzz.solutions import bucket_id
from kernel_emu import crosscheck, qemu
from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.profile import TargetProfile
from kernel_emu.result import Result
from workers.kernels import materialize
from workers.paths import KERNEL_NAME, SHA256, SLICE_ID, checked
from workers.settings import Settings
from workers.store import Bucket, FarmStore, StateWatch, StoreError, sha256

log = logging.getLogger("fuzzfarm.workers")

SEEDS = Path(__file__).parents[1] / "corpus" / "seeds"
SLICE_GRACE = 120.0  # start-up and wind-down of a slice's job process
REPORT_WAIT = 120.0  # how long a finished slice waits for Redis to take its report
PR_SET_PDEATHSIG = 1
# how often a slice reads its campaign's state, in case the message saying it stopped was lost
STATE_CHECK = 60.0
# a known bucket's reproducer is replaced by a slice's input only if clearly smaller: each
# triage costs ~10 Redis commands, and minimization shrinks reproducers anyway
SHRINK_WORTH_TRIAGE = 0.9
CORPUS_RECENT = 64
CORPUS_RANDOM = 64
Enqueue = Callable[..., None]

_executors: dict[tuple[str, str, bool, bool], Executor] = {}


def _executor(store: FarmStore, settings: Settings, kernel: str, *, snapshot: bool,
              watchdog: bool | None = None) -> Executor:
    """One executor per kernel build and mode in this worker process (a build's profile is
    keyed by its image and profile bytes, so a replaced build gets a new one). Snapshot
    executors serve minimization and stop stalled candidates early unless `watchdog` is
    False (the minimizer keeps only candidates with the bucket's own signature, and triage
    already judged with the full budget); a candidate proven to be in an exact cycle is taken
    to the budget instead, and ends as triage's run ends it. Full boots, for triage and
    verify, never stop early."""
    profile = _profile(store, settings, kernel)
    stops_early = snapshot if watchdog is None else watchdog
    key = (kernel, str(profile.source), snapshot, stops_early)
    ex = _executors.get(key)
    if ex is None:
        ex = _executors[key] = Executor(profile, snapshot=snapshot,
                                        watchdog=WATCHDOG if stops_early else None,
                                        cycles_to_budget=True)
    return ex


PROFILE_TTL = 10.0
_profiles: dict[tuple[int, str, str], tuple[float, TargetProfile]] = {}


def _profile(store: FarmStore, settings: Settings, kernel: str) -> TargetProfile:
    """The build's profile, looked up in Redis at most every PROFILE_TTL seconds: a batch of
    minimizations asks for it once, and a replaced build is picked up within seconds."""
    now = time.monotonic()
    key = (id(store), str(settings.cache_dir), kernel)
    hit = _profiles.get(key)
    if hit is not None and now - hit[0] < PROFILE_TTL:
        return hit[1]
    profile = materialize(store, kernel, settings.cache_dir)
    _profiles[key] = (now, profile)
    return profile


def record_harness_error(store: FarmStore, where: str, error: BaseException | str,
                         sha: str | None = None) -> None:
    store.stats.record_harness_error(where, str(error), sha)
    log.warning("harness error in %s: %s", where, error)


# fuzz slice ----------------------------------------------------------------------------------

def _sync_corpus(store: FarmStore, kernel: str, cache: Path, seeds: Path) -> set[str]:
    """Fill `seeds` with a sample of the shared corpus (the newest entries and a random few):
    libFuzzer runs every seed once when it starts, so the whole corpus would eat the slice.
    Downloads are kept in `cache`. Returns the sample's shas."""
    cache.mkdir(parents=True, exist_ok=True)
    seeds.mkdir(parents=True, exist_ok=True)
    sample = store.corpus.sample(kernel, CORPUS_RECENT, CORPUS_RANDOM)
    # each becomes a file name here: a corpus entry that is not a sha256 is left out
    bad = {sha for sha in sample if not SHA256.match(sha)}
    if bad:
        record_harness_error(store, f"corpus of {kernel}",
                             f"{len(bad)} entries are no input ids, e.g. {min(bad)!r:.80}")
        sample -= bad
    local = {p.name for p in cache.iterdir()}
    missing = sorted(sample - local)
    for i in range(0, len(missing), 200):
        chunk = missing[i:i + 200]
        for sha, data in zip(chunk, store.blobs.get_many(chunk), strict=True):
            if data is not None and sha256(data) == sha:
                _write_once(cache / sha, data)
    for sha in sample:
        if (cache / sha).is_file():
            os.symlink(cache / sha, seeds / sha)
    return sample


def run_fuzz_slice(store: FarmStore, settings: Settings, slice_id: str, worker: str,
                   enqueue_triage: Enqueue) -> dict[str, Any] | None:
    info = store.campaigns.slice(slice_id)
    if info is None:
        log.warning("unknown slice %s", slice_id)
        return None
    cid, kernel = info.campaign, info.kernel
    if store.campaigns.state(cid) != "running":
        store.campaigns.drop_slice(slice_id, cid, "cancelled")
        return None
    if not store.campaigns.claim_slice(slice_id, worker):
        return None  # delivered again: it ran, is running, or was replaced as lost
    try:
        return _run_claimed_slice(store, settings, slice_id, cid, kernel, info.seconds, worker,
                                  enqueue_triage)
    except Exception:
        # ours (this worker's disk full, say): the slice is given up at once, and replaced
        with contextlib.suppress(StoreError):
            store.campaigns.drop_slice(slice_id, cid, "failed")
            store.stats.count("slices_failed")
        raise


def _run_claimed_slice(store: FarmStore, settings: Settings, slice_id: str, cid: str,
                       kernel: str, seconds: float, worker: str,
                       enqueue_triage: Enqueue) -> dict[str, Any]:
    profile = materialize(store, kernel, settings.cache_dir)
    # both name folders: checked, as they come from Redis
    corpus_dir = settings.cache_dir / "corpus" / checked("kernel build name", KERNEL_NAME, kernel)
    work = Path(tempfile.mkdtemp(prefix=f"slice-{checked('slice id', SLICE_ID, slice_id)}-",
                                 dir=settings.cache_dir))
    try:
        shared = _sync_corpus(store, kernel, corpus_dir, work / "seeds")
        stream = SliceStream(store, slice_id, cid, kernel, work, corpus_dir, shared,
                             enqueue_triage)
        stats = _run_job(store, settings, profile.source, work, work / "seeds",
                         seconds, cid, worker, stream.tick)
        # what the job left must reach Redis before its folder goes: Redis away, wait for it
        _until_redis(lambda: stream.flush(stats, final=True, strict=True), slice_id)
        summary = {"execs": stats.execs if stats else 0, "edges": stats.edges if stats else 0,
                   "seconds": stats.elapsed if stats else 0.0,
                   "execs_per_second": stats.execs / stats.elapsed
                   if stats and stats.elapsed > 0 else 0.0,
                   "new_inputs": stream.new_inputs, "findings": stream.findings,
                   "harness_errors": stream.harness_errors, "worker": worker,
                   "stop_reason": stats.stop_reason if stats else "no statistics"}
        _until_redis(lambda: store.campaigns.finish_slice(slice_id, cid, summary), slice_id)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _until_redis(step: Callable[[], object], slice_id: str, wait: float = REPORT_WAIT) -> None:
    """Run `step`, again every second while Redis is away, for up to `wait` seconds; then
    the StoreError goes up (the controller declares the slice lost and replaces it)."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            step()
            return
        except StoreError as e:
            if time.monotonic() > deadline:
                raise
            if not said:
                log.warning("slice %s waits for Redis to take its report: %s", slice_id, e)
                said = True
            time.sleep(1.0)


class SliceStream:
    """What a running slice's job finds reaches Redis as it happens, so a worker killed
    mid-slice loses at most the last FLUSH_EVERY seconds of corpus and findings and
    PROGRESS_EVERY seconds of counts: new corpus entries, crashing inputs for triage (one per
    signature, and a clearly smaller one later), harness errors, and the job's counts, which
    also tell the controller the slice is alive. Redis being away only delays it all."""

    FLUSH_EVERY = 1.0
    PROGRESS_EVERY = 2.5
    # libFuzzer writes its corpus files in place: one younger than this may be half written
    SETTLE = 0.3

    def __init__(self, store: FarmStore, slice_id: str, cid: str, kernel: str, work: Path,
                 corpus_cache: Path, shared: set[str], enqueue_triage: Enqueue) -> None:
        self.store, self.slice_id, self.cid, self.kernel = store, slice_id, cid, kernel
        self.work, self.corpus_cache, self.enqueue_triage = work, corpus_cache, enqueue_triage
        self.known = set(shared)  # corpus shas the shared corpus has, or that were pushed
        self.seen_files: set[str] = set()  # corpus file names already read
        self.sent: dict[str, int] = {}  # bucket id -> size of the input sent to triage
        self.errors_seen: set[str] = set()
        self.new_inputs = self.findings = self.harness_errors = 0
        self.write_errors = 0  # the job's failed writes already reported
        self._next_flush = self._next_progress = 0.0

    def tick(self) -> None:
        """Called often while the job runs; does what is due."""
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self.FLUSH_EVERY
            self._guarded(self._push_files, final=False)
        if now >= self._next_progress:
            self._next_progress = now + self.PROGRESS_EVERY
            self._guarded(self._progress, _read_stats(self.work))

    def flush(self, stats: JobStats | None, final: bool, strict: bool = False) -> None:
        """Everything the job left, once it has exited (`strict`: Redis away is raised, for
        the caller to try again, instead of left to the next tick)."""
        if strict:
            self._push_files(final=final)
            if stats is not None:
                self._progress(stats)
            return
        self._guarded(self._push_files, final=final)
        if stats is not None:
            self._guarded(self._progress, stats)

    def _guarded(self, step: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            step(*args, **kwargs)
        except StoreError as e:  # Redis restarting: the next tick tries again
            log.warning("slice %s could not report yet: %s", self.slice_id, e)
        except OSError as e:  # this worker's disk full, say: the next tick tries again
            log.warning("slice %s could not read or write its files yet: %s", self.slice_id, e)

    def _progress(self, stats: JobStats | None) -> None:
        execs, edges = (stats.execs, stats.edges) if stats else (0, 0)
        self.store.campaigns.slice_progress(self.slice_id, self.cid, execs, edges)
        if stats is not None and stats.write_errors > self.write_errors:
            # the job could not write to its work folder: a harness error, never a finding
            record_harness_error(self.store, f"fuzz slice {self.slice_id}",
                                 f"the job failed {stats.write_errors - self.write_errors} "
                                 f"write(s) in its work folder, kept what it could not write "
                                 f"and goes on: {stats.last_write_error}")
            self.write_errors = stats.write_errors
            self.harness_errors += 1

    def _push_files(self, final: bool) -> None:
        self._push_corpus(final)
        self._push_findings()
        self._push_errors()

    def _push_corpus(self, final: bool) -> None:
        folder = self.work / "corpus"
        if not folder.is_dir():
            return
        settled = time.time() - self.SETTLE
        fresh: list[bytes] = []
        names: list[str] = []
        for path in folder.iterdir():
            if path.name in self.seen_files or path.name.startswith("."):
                continue
            try:
                if not final and path.stat().st_mtime > settled:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            names.append(path.name)
            sha = sha256(data)
            if sha not in self.known:
                fresh.append(data)
        # slow inputs (megabytes of segments, say) are kept out of the shared corpus; the job
        # lists one in its statistics before libFuzzer writes it to the corpus
        stats = _read_stats(self.work) if fresh else None
        slow = set(stats.slow_inputs) if stats else set()
        fresh = [data for data in fresh if sha256(data) not in slow]
        if fresh:
            self.store.corpus.add(self.kernel, fresh)
            for data in fresh:
                with contextlib.suppress(OSError):  # a download cache: Redis has them
                    _write_once(self.corpus_cache / sha256(data), data)
        self.seen_files.update(names)
        self.known.update(sha256(data) for data in fresh)
        self.new_inputs += len(fresh)

    def _push_findings(self) -> None:
        """Crashing inputs to triage (in one task, unless a task of this build is queued
        already, which takes them): per signature the smallest input the job kept, when the
        bucket is new to this slice and to the farm or the input is clearly smaller than the
        smallest known one. Known buckets hit again are marked seen."""
        root = self.work / "solutions"
        if not root.is_dir():
            return
        smallest: dict[str, Path] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            inputs = sorted((p for p in folder.glob("*.elf") if not p.name.startswith(".")),
                            key=lambda p: (p.stat().st_size, p.name))
            if inputs:
                smallest[folder.name] = inputs[0]
        changed = {bid: path for bid, path in smallest.items()
                   if bid not in self.sent
                   or path.stat().st_size < self.sent[bid] * SHRINK_WORTH_TRIAGE}
        if not changed:
            return
        known = self.store.buckets.smallest_sizes(list(changed))
        send: list[bytes] = []
        for bid, path in changed.items():
            size = known.get(bid)
            if size is None or path.stat().st_size < size * SHRINK_WORTH_TRIAGE:
                send.append(path.read_bytes())
        self.store.buckets.mark_seen([bid for bid, size in known.items() if size is not None])
        shas = self.store.blobs.put_many(send) if send else []
        # recorded before the task is sent: if this worker dies now, or the broker is away,
        # the controller re-sends it
        self.store.triage.pending(shas, self.kernel)
        # only now are they as good as sent: Redis failing before this, they are sent again
        for bid, path in changed.items():
            self.sent[bid] = min(self.sent.get(bid, 1 << 62), path.stat().st_size)
        if not shas:
            return
        self.findings += len(shas)
        # a triage task still queued for this build takes these too when it starts: a worker
        # triages between its slices, so one task per flush would pile up
        if not self.store.triage.should_send(self.kernel):
            return
        try:
            self.enqueue_triage(self.kernel, shas)
        except Exception as e:  # noqa: BLE001 - the broker away: the controller sends them
            self.store.triage.not_sent(self.kernel)
            log.warning("slice %s could not send %d input(s) to triage (the controller will "
                        "send them): %s", self.slice_id, len(shas), e)

    def _push_errors(self) -> None:
        folder = self.work / "harness-errors"
        if not folder.is_dir():
            return
        for report in sorted(folder.glob("*.json")):
            if report.name in self.errors_seen or report.name.startswith("."):
                continue
            detail = json.loads(report.read_text())
            record_harness_error(self.store, f"fuzz slice {self.slice_id}",
                                 detail.get("error", "?"), detail.get("input_sha256"))
            self.errors_seen.add(report.name)
            self.harness_errors += 1


def _read_stats(work: Path) -> JobStats | None:
    try:
        return JobStats.from_json(json.loads(stats_path(work, 0).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _die_with_parent() -> None:
    """In the job process, before exec: if the worker process is killed (even with SIGKILL),
    the kernel kills the job too, so no orphan keeps fuzzing."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _write_once(path: Path, data: bytes) -> None:
    """Several workers on one machine share the cache: write under a private name, rename."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run_job(store: FarmStore, settings: Settings, profile: Path, work: Path, corpus: Path,
             seconds: float, cid: str, worker: str,
             tick: Callable[[], None] = lambda: None) -> JobStats | None:
    """Run the slice's fuzzing job to its end, calling `tick` every quarter second; stopped
    early (it writes its statistics and exits) when the campaign stops or the worker shuts
    down."""
    config = JobConfig(kernel=str(profile), out=str(work), seeds=[str(corpus), str(SEEDS)],
                       seconds=seconds, rss_limit_mb=settings.slice_rss_mb,
                       seed=int.from_bytes(os.urandom(3), "little"))
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    with (work / "jobs" / "job-0.log").open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "fuzz.harness", config.dumps()],
                                 stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=job_environment(),
                                 start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + seconds + SLICE_GRACE
        watch = _CampaignWatch(store, cid, worker)
        asked_to_stop = False
        try:
            while child.poll() is None:
                tick()
                if watch.stopped(wait=0.25):
                    child.send_signal(signal.SIGTERM)  # the job writes its stats, exits
                    asked_to_stop = True
                    watch.close()
                if time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    harness_error_if_possible(store, "fuzz slice",
                                               "job process overran its slice")
        finally:
            watch.close()
            if child.poll() is None:
                child.kill()
                child.wait()
    # a job stopped before it could install its own handler dies of the signal: not a failure
    stopped_early = asked_to_stop and child.returncode == -signal.SIGTERM
    if child.returncode not in (0, None) and not stopped_early:
        harness_error_if_possible(store, "fuzz slice",
                                   f"job process exited with status {child.returncode}")
    return _read_stats(work)


def harness_error_if_possible(store: FarmStore, where: str, error: str) -> None:
    """A slice's own failure, recorded unless Redis is away right now (it is logged anyway)."""
    try:
        record_harness_error(store, where, error)
    except StoreError:
        log.warning("harness error in %s (not recorded, Redis unavailable): %s", where, error)


class _CampaignWatch:
    """Tells a running slice to stop: its campaign no longer runs, or its worker is shutting
    down. Either arrives at once on a subscription (free of commands); the campaign's state is
    also read every STATE_CHECK seconds in case a message was missed (Redis restarted, say)."""

    def __init__(self, store: FarmStore, cid: str, worker: str | None = None) -> None:
        self.store, self.cid, self.worker = store, cid, worker
        self.sub: StateWatch | None = None
        self.done = False
        self.next_check = time.monotonic() + STATE_CHECK
        try:
            self.sub = store.campaigns.watch_state(cid, worker)
        except StoreError:
            self.sub = None

    def stopped(self, wait: float) -> bool:
        if self.done:
            time.sleep(wait)
            return False
        if self.sub is not None:
            try:
                state = self.sub.next_state(timeout=wait)
            except (StoreError, OSError):
                self._drop_subscription()
                state = None
            if state is not None:
                self.done = state != "running"
                return self.done
        else:
            time.sleep(wait)
        if time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + STATE_CHECK
            try:
                self.done = self.store.campaigns.state(self.cid) != "running"
                if self.sub is None and not self.done:  # a restarted Redis: listen again
                    self.sub = self.store.campaigns.watch_state(self.cid, self.worker)
            except StoreError:
                return False  # Redis restarting: the slice goes on
        return self.done

    def _drop_subscription(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(StoreError, OSError):
                sub.close()

    def close(self) -> None:
        if self.sub is not None:
            self._drop_subscription()
        self.done = True


# triage --------------------------------------------------------------------------------------

def triage_input(store: FarmStore, settings: Settings, sha: str, kernel: str,
                 enqueue_minimize: Enqueue) -> dict[str, Any]:
    """Re-run one crashing input with a full boot and every oracle; count it in its bucket."""
    return triage_inputs(store, settings, kernel, [sha], enqueue_minimize)[0]


def triage_inputs(store: FarmStore, settings: Settings, kernel: str, shas: list[str],
                  enqueue_minimize: Enqueue) -> list[dict[str, Any]]:
    """Triage several inputs of one kernel build: their bytes, reports and the pending marks
    move in one command each, whatever their number; each crash is counted in its bucket."""
    shas = list(dict.fromkeys(shas))
    try:
        blobs = store.blobs.get_many(shas)
        ex = _executor(store, settings, kernel, snapshot=False)
    except HarnessError as e:  # an unknown or broken kernel build: every input says so
        for sha in shas:
            record_harness_error(store, "triage", e, sha)
        store.triage.done(shas, kernel)
        return [{"state": "harness-error", "error": str(e)} for _ in shas]
    outcomes: list[dict[str, Any]] = []
    reports: dict[str, dict[str, Any]] = {}
    crashes: list[tuple[int, str, int, Result]] = []
    verdicts: dict[str, int] = {}
    for sha, data in zip(shas, blobs, strict=True):
        if data is None:
            record_harness_error(store, "triage", "input not found in Redis", sha)
            outcomes.append({"state": "missing"})
            continue
        try:
            result = ex.run(data)
        except HarnessError as e:
            record_harness_error(store, "triage", e, sha)
            outcomes.append({"state": "harness-error", "error": str(e)})
            continue
        reports[sha] = result.to_json()
        outcomes.append({"state": result.verdict})
        if result.verdict == "crash" and result.signature:
            crashes.append((len(outcomes) - 1, sha, len(data), result))
        else:
            verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
    # reports first: a bucket never names a reproducer whose report is missing
    store.reports.put_many(kernel, reports)
    to_minimize: list[str] = []
    for i, sha, size, result in crashes:
        assert result.signature is not None
        bid = bucket_id(result.signature)
        up = store.buckets.upsert(bid, result.signature, result.crash_class or "?", kernel, sha,
                                 size, _sample(sha, kernel, result))
        if up.minimize:
            to_minimize.append(bid)
        outcomes[i] = {"state": "crash", "bucket": bid, "new": up.new, "shrank": up.shrank,
                       "minimize": up.minimize}
    if to_minimize:
        enqueue_minimize(to_minimize)  # one task for all of them
    for verdict, n in verdicts.items():
        store.stats.count(f"triage_{verdict}", n)
    store.triage.done(shas, kernel)
    return outcomes


def _sample(sha: str, kernel: str, result: Result) -> dict[str, Any]:
    return {"input": sha, "kernel": kernel, "time": time.time(), "class": result.crash_class,
            "evidence": [e for f in result.findings[:3] for e in f.evidence[:2]],
            "symbol": result.symbol}


# minimize and verify -------------------------------------------------------------------------

def minimize_bucket(store: FarmStore, settings: Settings, bid: str) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    try:
        outcome = _minimize_bucket(store, settings, bid)
        return outcome
    finally:
        if outcome.get("state") != "minimized":  # storing the result marked it done
            store.buckets.minimize_ended(bid)


def _minimize_bucket(store: FarmStore, settings: Settings, bid: str) -> dict[str, Any]:
    bucket = store.buckets.get(bid)
    if bucket is None:
        return {"state": "unknown bucket"}
    data = store.blobs.get(bucket.reproducer)
    if data is None:
        record_harness_error(store, "minimize", "reproducer not found in Redis",
                             bucket.reproducer)
        return {"state": "missing"}
    try:
        ex = _executor(store, settings, bucket.kernel, snapshot=True)
        if ex.run(data).signature != bucket.signature:
            now = _executor(store, settings, bucket.kernel, snapshot=False).run(data)
            if now.signature != bucket.signature:
                # triage itself files the reproducer elsewhere now: the bucket was made by
                # other oracles (before a cause was named, say). Not the farm failing
                why = ("these oracles file the reproducer under another signature: "
                       f"{now.signature or now.verdict}")
                store.buckets.set_minimize_error(bid, why)
                return {"state": "signature changed", "error": why}
            if ex.stalled_at:
                # The watchdog stopped the reproducer, and it stops some hangs in another
                # function of their loop than the full budget does: minimized without it,
                # as triage ran it (an exact cycle is skipped: a hang costs milliseconds).
                ex = _executor(store, settings, bucket.kernel, snapshot=True, watchdog=False)
        outcome = minimize(data, ex, max_executions=settings.minimize_executions)
    except NotACrash as e:
        store.buckets.set_minimize_error(bid, str(e))
        return {"state": "not a crash", "error": str(e)}
    except HarnessError as e:
        record_harness_error(store, "minimize", e, bucket.reproducer)
        return {"state": "harness-error"}
    if outcome.signature != bucket.signature:
        # the snapshot executor disagrees with triage's full boot: keep the reproducer as is
        record_harness_error(store, "minimize", "signature changed under the snapshot executor",
                             bucket.reproducer)
        return {"state": "signature changed"}
    min_sha = store.reports.put_with_input(outcome.data, bucket.kernel,
                                           outcome.result.to_json())
    stored = store.buckets.set_minimized(bid, min_sha, outcome.size)
    return {"state": "minimized", "size": outcome.size, "from": outcome.original_size,
            "stored": stored, "executions": outcome.executions}


def _bucket_input(store: FarmStore, bid: str) -> tuple[Bucket | None, str, bytes | None]:
    """The bucket, the input a developer takes from it (the minimized one if there is one)
    and that input's bytes (None when Redis lacks them)."""
    bucket = store.buckets.get(bid)
    if bucket is None:
        return None, "", None
    sha = bucket.minimized or bucket.reproducer
    return bucket, sha, store.blobs.get(sha)


def verify_bucket(store: FarmStore, settings: Settings, bid: str, kernel: str) -> dict[str, Any]:
    """Does this bucket's reproducer still crash the same way on `kernel`?"""
    bucket, sha, data = _bucket_input(store, bid)
    if bucket is None:
        return {"state": "unknown bucket"}
    if data is None:
        return {"state": "missing"}
    try:
        result = _executor(store, settings, kernel, snapshot=False).run(data)
    except HarnessError as e:
        record_harness_error(store, f"verify on {kernel}", e, sha)
        state = {"state": "harness-error", "error": str(e), "time": time.time()}
        store.buckets.set_verify(bid, kernel, state)
        return state
    store.reports.put(sha, kernel, result.to_json())
    # the same class, or the bucket's own finding among the run's: a bucket filed before
    # the farm named its cause still reproduces when that finding comes as a consequence
    same = result.verdict == "crash" and (
        result.crash_class == bucket.crash_class
        or any(f.signature() == bucket.signature for f in result.findings))
    state = {"state": "reproduces" if same else "fixed", "verdict": result.verdict,
             "class": result.crash_class, "signature": result.signature, "input": sha,
             "time": time.time()}
    store.buckets.set_verify(bid, kernel, state)
    return state


# crosscheck on real firmware -----------------------------------------------------------------

CROSSCHECK_TIMEOUT = 90.0  # seconds QEMU may take to reach the kernel's last line
DIFFERENCES_KEPT = 5


def crosscheck_bucket(store: FarmStore, settings: Settings, bid: str) -> dict[str, Any]:
    """Boot the bucket's input (the minimized one if there is one) on its build under QEMU +
    OVMF as well as in the emulator, and record whether the kernel says the same on both:
    yes, no (with the first differences), or not-run (the build is no UEFI application).
    A QEMU that cannot boot is the farm's failure: a harness error, never a "no"."""
    bucket, sha, data = _bucket_input(store, bid)
    if bucket is None:
        return {"state": "unknown bucket"}
    state = {**_crosscheck(store, settings, bucket.kernel, sha, data), "input": sha,
             "time": time.time()}
    store.buckets.set_crosscheck(bid, state)
    return state


def _crosscheck(store: FarmStore, settings: Settings, kernel: str, sha: str,
                data: bytes | None) -> dict[str, Any]:
    if data is None:
        record_harness_error(store, "crosscheck", "input not found in Redis", sha)
        return {"state": "harness-error", "reason": "input not found in Redis"}
    profile = _profile(store, settings, kernel)
    if not crosscheck.is_uefi(profile):
        return {"state": "not-run", "reason": f"build '{kernel}' is no UEFI application"}
    why = qemu.missing()
    if why is not None:  # a worker given the queue without QEMU: say so, do not guess
        return {"state": "not-run", "reason": why}
    try:
        check = crosscheck.crosscheck(profile, data, CROSSCHECK_TIMEOUT,
                                      _executor(store, settings, kernel, snapshot=False))
    except (HarnessError, qemu.FirmwareBootError) as e:
        record_harness_error(store, "crosscheck", e, sha)
        return {"state": "harness-error", "reason": str(e)[:500]}
    return {"state": "yes" if check.same else "no", "lines": len(check.emulated),
            "differences": [list(d) for d in check.differences[:DIFFERENCES_KEPT]],
            "more_differences": max(0, len(check.differences) - DIFFERENCES_KEPT),
            "after": check.after[:3], "real_ended": check.real_ended,
            "seconds_emulated": round(check.seconds_emulated, 2),
            "seconds_real": round(check.seconds_real, 2), "load_base": check.load_base}
