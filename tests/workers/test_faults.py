"""Faults injected into a running farm, and what each one cost, counted.

Every test runs a real farm (a Redis server, a Celery worker, the controller, a campaign on the
`seed` build), injects one fault, lets the farm recover by itself, and then audits Redis
against what the slices' jobs wrote to their work folders:

- findings lost: a signature a job recorded (`solutions/<bucket>/<sha>.elf` in its slice's
  work folder) that never got a bucket, or whose input stays pending in triage;
- duplicates: two buckets with one signature, a bucket not keyed by the sha256 of its
  signature, an input counted twice in a bucket's count, or execs counted twice in the
  campaign's.

A worker killed outright may lose what its slice found in its last FIND_WINDOW seconds and
its counts of the last PROGRESS_WINDOW seconds (workers/work.py, SliceStream); nothing else
may be lost. Each test prints its figures (pytest -s); docs/reliability.md collects them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from fuzz.solutions import bucket_id
from tests.reproducers import REPRODUCERS
from tests.workers.conftest import ROOT, Farm, RedisServer, farm_env, running_redis, wait_for
from workers.app import make_app
from workers.kernels import ensure_builtin
from workers.settings import Settings
from workers.store import Campaign, FarmStore, sha256

pytestmark = [pytest.mark.redis, pytest.mark.farm]

FIND_WINDOW = 2.0
PROGRESS_WINDOW = 5.0
EXAMPLES = ROOT / "fuzzfarm" / "examples"
OUTAGE = 30.0  # how long Redis is away in the outage tests


# what the jobs wrote ------------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """A signature one slice's job recorded."""

    slice: str
    bucket: str  # the folder it is in, named by the job from the signature
    signature: str
    written: float  # when the job wrote the first input of it (file time)


class WorkFolders:
    """Reads the slices' work folders (FUZZFARM_CACHE/slice-<id>-*) while they exist: a slice
    that ends normally deletes its folder, so what its job found is read as it runs (every
    0.1 s, more often than a slice sends anything to Redis)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.found: dict[tuple[str, str], Found] = {}
        self.execs: dict[str, int] = {}  # slice -> execs in its job's last statistics
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkFolders:
        self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None
                 ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(0.1)

    def scan(self) -> None:
        for folder in self.cache.glob("slice-*"):
            with contextlib.suppress(OSError):  # a slice's end deletes its folder at any time
                self._scan(folder)

    def _scan(self, folder: Path) -> None:
        sid = folder.name.split("-")[1]
        with contextlib.suppress(OSError, ValueError, KeyError):
            execs = int(json.loads((folder / "jobs" / "job-0.json").read_text())["execs"])
            with self._lock:
                self.execs[sid] = max(self.execs.get(sid, 0), execs)
        for result in list((folder / "solutions").glob("*/*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                # the job writes an input's Result first, then the input
                written = result.with_suffix(".elf").stat().st_mtime
                key = (sid, result.parent.name)
                with self._lock:
                    known = self.found.get(key)
                if known is not None and known.written <= written:
                    continue
                signature = json.loads(result.read_text())["signature"]
                with self._lock:
                    self.found[key] = Found(sid, result.parent.name, signature, written)

    def slices(self) -> list[str]:
        with self._lock:
            return sorted(self.execs)

    def findings(self) -> list[Found]:
        with self._lock:
            return list(self.found.values())


# what Redis says ----------------------------------------------------------------------------

@dataclass
class Audit:
    signatures: int  # (slice, signature) pairs the jobs recorded
    excused: int  # recorded within FIND_WINDOW before their slice was killed
    lost: list[str]  # signatures recorded, not excused, with no bucket
    pending: int  # inputs still waiting for triage
    buckets: int
    duplicates: list[str] = field(default_factory=list)
    double_counted: list[str] = field(default_factory=list)
    execs_done: int = 0  # execs the jobs did (their own statistics)
    execs_counted: int = 0  # the campaign's count

    def __str__(self) -> str:
        return (f"{self.signatures} signatures found (counted per slice), "
                f"{len(self.lost)} lost ({self.excused} within a killed slice's window), "
                f"{self.pending} pending; {self.buckets} buckets, {len(self.duplicates)} "
                f"duplicate, {len(self.double_counted)} counted twice; execs done "
                f"{self.execs_done:,}, counted {self.execs_counted:,}")


def audit(store: FarmStore, folders: WorkFolders, cid: str | None,
          killed: dict[str, float] | None = None) -> Audit:
    """Compare Redis with what the jobs wrote, once the farm has settled."""
    killed = killed or {}
    found = folders.findings()
    buckets = store.buckets.all()
    by_id = {b.id: b for b in buckets}
    excused = [f for f in found if f.slice in killed and
               f.written > killed[f.slice] - FIND_WINDOW]
    lost = sorted({f.signature for f in found if f not in excused and
                   (f.bucket not in by_id or by_id[f.bucket].signature != f.signature)})
    a = Audit(len(found), len(excused), lost, store.triage.backlog(), len(buckets))
    per_signature = Counter(b.signature for b in buckets)
    a.duplicates = [b.id for b in buckets if per_signature[b.signature] > 1
                    or b.id != bucket_id(b.signature)]
    for b in buckets:
        inputs = store.buckets.counted_inputs(b.id)
        # each input once, and each one of this signature (triage's full boot said so)
        wrong = [sha for sha in inputs if (store.reports.get(sha, "seed") or {}).get(
            "signature") != b.signature]
        if b.count != len(inputs) or wrong:
            a.double_counted.append(f"{b.id}: count {b.count}, {len(inputs)} inputs, "
                                    f"{len(wrong)} of another signature")
    if cid is not None:
        sids = folders.slices()
        slices = {s.id: s for s in store.campaigns.slices(sids)}
        for sid in sids:
            s = slices.get(sid)
            if s is not None and s.state == "done" and s.stats is not None:
                a.execs_done += int(s.stats["execs"])
            else:  # killed: its job's last statistics are still on disk
                a.execs_done += folders.execs.get(sid, 0)
        campaign = store.campaigns.get(cid)
        assert campaign is not None
        a.execs_counted = campaign.execs
    return a


def settle(store: FarmStore, cid: str, timeout: float = 120.0) -> None:
    """End the campaign (its slices report and stop) and let triage finish."""
    store.campaigns.set_state(cid, "stopping")
    wait_for(lambda: store.campaigns.state(cid) == "stopped", timeout, "the campaign to stop")
    wait_for(lambda: store.triage.backlog() == 0, timeout, "triage to finish")


def _campaign(store: FarmStore, cid: str) -> Campaign:
    campaign = store.campaigns.get(cid)
    assert campaign is not None
    return campaign


def _running_slice(store: FarmStore, cid: str) -> str | None:
    for s in store.campaigns.slices(store.campaigns.inflight(cid)):
        if s.state == "running":
            return s.id
    return None


def _fuzzing_again(store: FarmStore, cid: str, since: float) -> bool:
    """A slice started after `since` (Redis's clock) has reported progress."""
    return any(s.state in ("running", "done") and (s.started or 0) > since
               and (s.seen or 0) > (s.started or 0)
               for s in store.campaigns.slices(store.campaigns.inflight(cid)))


def _elapsed(work: Path) -> float:
    """Seconds the slice's job has fuzzed, by its statistics."""
    try:
        return float(json.loads((work / "jobs" / "job-0.json").read_text())["elapsed"])
    except (OSError, ValueError, KeyError):
        return 0.0


def _older(paths, before: float) -> list[Path]:
    """The paths last written before `before`; a file that vanishes meanwhile (libFuzzer
    replaces corpus entries by smaller ones as it goes) is left out."""
    found = []
    for p in paths:
        try:
            if p.stat().st_mtime < before:
                found.append(p)
        except FileNotFoundError:
            pass
    return found


def _job_running(sid: str) -> bool:
    """A slice's job process is alive (its work folder is named after the slice)."""
    return subprocess.run(["pgrep", "-f", f"slice-{sid}-"],
                          capture_output=True).returncode == 0


def _all_alive(farm: Farm) -> None:
    for name, proc in farm.procs.items():
        assert proc.poll() is None, f"{name} exited with {proc.returncode}"


# 1. a worker killed outright ----------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_of_a_worker_mid_slice(farm: Farm, store: FarmStore) -> None:
    farm.env["FUZZFARM_TRIAGE_GRACE"] = "10"
    cache = Path(farm.env["FUZZFARM_CACHE"])
    with WorkFolders(cache) as folders:
        farm.worker("w1")
        farm.worker("w2")  # takes over: nothing is restarted by hand
        farm.controller()
        cid = store.campaigns.create("seed", 1, 60)
        sid = str(wait_for(lambda: _running_slice(store, cid), 90, "a running slice"))

        def ripe() -> bool:
            """The slice has something to lose: findings and corpus from before the window."""
            old = time.time() - FIND_WINDOW - 1
            work = next(cache.glob(f"slice-{sid}-*"), None)
            if work is None:
                return False
            solutions = _older(work.glob("solutions/*/*.elf"), old)
            corpus = _older(work.glob("corpus/*"), old)
            return len(solutions) >= 1 and len(corpus) >= 10 and _elapsed(work) >= 10

        wait_for(ripe, 90, "the slice to find something", poll=0.2)
        work = next(cache.glob(f"slice-{sid}-*"))
        running = store.campaigns.slice(sid)
        assert running is not None and running.worker
        killed = time.time()
        t0 = time.monotonic()
        # the worker running the slice, and its pool; the job process dies with them
        farm.kill9(running.worker.split("@")[0])
        wait_for(lambda: not _job_running(sid), 10, "the job process to die with its worker")
        # what the job wrote a window before the kill is in Redis already
        stats = json.loads((work / "jobs" / "job-0.json").read_text())
        slow = set(stats.get("slow_inputs", []))
        corpus = {sha256(p.read_bytes()) for p in (work / "corpus").iterdir()
                  if p.stat().st_mtime < killed - FIND_WINDOW}
        missing_corpus = [s for s in corpus - slow if not store.corpus.has("seed", s)]
        rate = stats["execs"] / max(stats["elapsed"], 1e-9)
        since = store.campaigns.server_time()
        wait_for(lambda: store.stats.counters().get("slices_lost", 0) == 1, 60,
                 "the controller to declare the slice lost")
        lost = store.campaigns.slice(sid)
        assert lost is not None and lost.state == "lost"
        wait_for(lambda: _fuzzing_again(store, cid, since), 90, "a replacement slice")
        recovered = time.monotonic() - t0
        settle(store, cid)
    a = audit(store, folders, cid, killed={sid: killed})
    lost_execs = a.execs_done - a.execs_counted
    print(f"\nkill -9 mid-slice, {stats['elapsed']:.0f} s into it: {a}; corpus missing "
          f"{len(missing_corpus)} of {len(corpus)}; {lost_execs:,} execs not counted "
          f"({lost_execs / rate:.1f} s of fuzzing); fuzzing again {recovered:.1f} s after "
          f"the kill")
    assert missing_corpus == []
    assert a.signatures > 0 and a.lost == [] and a.pending == 0
    assert a.duplicates == [] and a.double_counted == []
    assert 0 <= lost_execs <= rate * PROGRESS_WINDOW
    assert store.stats.counters().get("harness_errors", 0) == 0
    _all_alive(farm)


def _hangs(n: int) -> list[bytes]:
    """`n` distinct inputs with one signature, each ~1-3 s of a full boot (RX-06's endless
    program-header loop, run to the full instruction budget)."""
    base = (EXAMPLES / "three-segments.elf").read_bytes()
    hang = next(r for r in REPRODUCERS if r.bug == "RX-06").make(base)
    return [hang + bytes([i]) * (i + 1) for i in range(n)]


def _triaging(store: FarmStore) -> str | None:
    """The name of the farm worker running a triage task, if one is."""
    for node, beat in store.stats.workers().items():
        if beat.task == "triage":
            return node.split("@")[0]
    return None


def test_kill_9_mid_triage(farm: Farm, store: FarmStore) -> None:
    farm.env["FUZZFARM_TRIAGE_GRACE"] = "6"
    farm.worker("w1")
    farm.worker("w2")
    farm.controller()
    app = make_app(Settings(redis_url=farm.url))
    shas = store.blobs.put_many(_hangs(3))
    store.triage.pending(shas, "seed")
    wait_for(lambda: all("ready." in farm.log(w) for w in ("w1", "w2")), 60,
             "the workers to be up")
    app.send_task("workers.tasks.triage_many", args=["seed", shas])
    worker = str(wait_for(lambda: _triaging(store), 60, "the triage to start", poll=0.05))
    farm.kill9(worker)
    t0 = time.monotonic()
    # killed halfway through seconds of boots: nothing was counted, all is still pending
    assert store.buckets.all() == [] and store.triage.backlog() == 3
    wait_for(lambda: store.triage.backlog() == 0 and store.buckets.all(), 120,
             "the triage to be sent again and finish")
    recovered = time.monotonic() - t0
    (bucket,) = store.buckets.all()
    counted = store.buckets.counted_inputs(bucket.id)
    print(f"\nkill -9 mid-triage: 3 inputs, {len(store.buckets.all())} bucket counting "
          f"{bucket.count} ({len(counted)} distinct inputs); triaged {recovered:.1f} s after "
          f"the kill")
    # endless loops (RX-06) whose cause is in the input: filed under it, the hang its consequence
    assert bucket.crash_class == "unchecked-field" and bucket.id == bucket_id(bucket.signature)
    assert bucket.count == 3 and counted == set(shas)
    assert store.stats.counters().get("triage_resent", 0) >= 1
    _all_alive(farm)


# 2, 3. Redis restarted, frozen -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault", ["down-30s", "frozen-30s"])
def test_redis_outage_mid_campaign(farm: Farm, store: FarmStore, redis_server: RedisServer,
                                   fault: str) -> None:
    """down-30s: stopped (SIGTERM: it writes its AOF and exits), then started again 30 s later
    on the same data folder and port (connections refused meanwhile).
    frozen-30s: SIGSTOP, then SIGCONT 30 s later (connections stay open and nothing answers).
    Slices run through it; no process may exit."""
    farm.env["FUZZFARM_TRIAGE_GRACE"] = "10"
    cache = Path(farm.env["FUZZFARM_CACHE"])
    with WorkFolders(cache) as folders:
        farm.worker("w1")
        farm.controller()
        cid = store.campaigns.create("seed", 1, 6)
        wait_for(lambda: store.buckets.all() and _campaign(store, cid).slices_done >= 1
                 and _running_slice(store, cid), 150, "a bucket, a finished and a running slice")
        before = {b.id: b.count for b in store.buckets.all()}
        done = _campaign(store, cid).slices_done
        failures = farm.log("controller").count("controller step failed")
        server = redis_server.proc
        assert server is not None
        if fault == "frozen-30s":
            server.send_signal(signal.SIGSTOP)
            try:
                time.sleep(OUTAGE)  # the fault itself
            finally:
                server.send_signal(signal.SIGCONT)
        else:
            redis_server.stop()  # SIGTERM: Redis writes and fsyncs its AOF before it exits
            down = time.monotonic()
            wait_for(lambda: farm.log("controller").count("controller step failed")
                     > failures, 30, "the controller to notice that Redis is gone")
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))  # the fault itself
            redis_server.start()
        t0 = time.monotonic()
        after = FarmStore.connect(redis_server.url)
        since = after.campaigns.server_time()
        execs = _campaign(after, cid).execs
        for bid, count in before.items():
            b = after.buckets.get(bid)
            assert b is not None and b.count >= count
        wait_for(lambda: _campaign(after, cid).execs > execs, 60, "counts to arrive again",
                 poll=0.1)
        counting = time.monotonic() - t0
        wait_for(lambda: _fuzzing_again(after, cid, since), 120,
                 "a slice started after the outage to report progress")
        recovered = time.monotonic() - t0
        wait_for(lambda: _campaign(after, cid).slices_done > done, 120,
                 "a slice to finish after the outage")
        _all_alive(farm)  # nothing died of the outage
        settle(after, cid)
    a = audit(after, folders, cid)
    print(f"\nRedis {fault}: {a}; {after.stats.counters().get('slices_lost', 0)} slices "
          f"declared lost; after Redis was back, counts arrived again in {counting:.1f} s and "
          f"a new slice fuzzed in {recovered:.1f} s")
    assert a.signatures > 0 and a.lost == [] and a.pending == 0
    assert a.duplicates == [] and a.double_counted == []
    assert a.execs_counted == a.execs_done
    assert after.stats.counters().get("harness_errors", 0) == 0
    _all_alive(farm)


# 4. the output disk full ----------------------------------------------------------------------

FULL = 20.0  # how long the disk stays full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 MiB tmpfs: the farm's data disk (Redis's AOF and the workers' cache) in small."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Fill `disk` to its last byte; returns the file that does it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 4096, 1):  # then what is left of the last pages
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_the_output_disk_full(small_disk: Path, tmp_path: Path) -> None:
    """Redis's AOF and the worker's cache on one small disk, filled for FULL seconds while a
    slice fuzzes: the job goes on, keeping what it cannot write; the failures are harness
    errors (never a bucket); Redis refuses writes and the slice sends them again; once there
    is room the farm goes on by itself and nothing the job found is lost."""
    cache = small_disk / "cache"
    with running_redis(small_disk / "redis") as server:
        env = farm_env(server.url, cache) | {"FUZZFARM_TRIAGE_GRACE": "10"}
        farm = Farm(server.url, tmp_path, env)
        store = FarmStore.connect(server.url)
        ensure_builtin(store)
        try:
            _survive_a_full_disk(small_disk, cache, farm, store)
        finally:
            farm.stop()
            store.close()


def _survive_a_full_disk(small_disk: Path, cache: Path, farm: Farm, store: FarmStore) -> None:
    with WorkFolders(cache) as folders:
        farm.worker("w1")
        farm.controller()
        # one slice longer than the outage: its job lives through it
        cid = store.campaigns.create("seed", 1, FULL + 25)
        sid = str(wait_for(lambda: _running_slice(store, cid), 90, "a running slice"))
        wait_for(lambda: any(f.slice == sid for f in folders.findings()) and
                 _elapsed(next(cache.glob(f"slice-{sid}-*"))) > 5, 90,
                 "the slice to find something")
        filler = _fill(small_disk)
        full_from = time.time()
        time.sleep(FULL)  # the fault itself
        filler.unlink()
        room = time.monotonic()
        wait_for(lambda: getattr(store.campaigns.slice(sid), "state", None) == "done", 120,
                 "the slice that lived through the full disk to finish")
        done = store.campaigns.slice(sid)
        assert done is not None and done.stats is not None
        settle(store, cid)
    a = audit(store, folders, cid)
    errors = [e.error for e in store.stats.harness_errors()]
    writes = [e for e in errors if "write(s) in its work folder" in e]
    found_while_full = [f for f in folders.findings()
                        if f.slice == sid and f.written >= full_from]
    print(f"\noutput disk full {FULL:.0f} s: {a}; the slice through it: "
          f"{done.stats['execs']:,} execs, stop reason {done.stats['stop_reason']!r}, "
          f"{len(found_while_full)} reproducers written once there was room; "
          f"{len(errors)} harness errors ({len(writes)} of failed writes), "
          f"{store.stats.counters().get('slices_failed', 0)} slices given up; finished "
          f"{time.monotonic() - room:.1f} s after there was room")
    assert done.stats["stop_reason"] == "time"  # the job was never killed by the fault
    assert writes and "No space left on device" in writes[0]
    assert not any("exited with status" in e for e in errors)
    assert a.signatures > 0 and a.lost == [] and a.pending == 0
    assert a.duplicates == [] and a.double_counted == []
    assert a.execs_counted == a.execs_done
    # no failure of ours became a finding
    assert all("Error" not in b.signature for b in store.buckets.all())
    _all_alive(farm)
