"""Every way of stopping the farm is Ctrl-C, and a slice is crash-safe: `fuzzfarm up` stopped by
SIGTERM, SIGHUP or even SIGKILL stops its slices, workers, controller and Redis in order and
leaves nothing running; what a slice found reaches Redis while it runs, so a worker killed
mid-slice loses only the last seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers.conftest import ROOT, Farm, RedisServer, wait_for
from workers.local import url_from_status
from workers.store import FarmStore, sha256

pytestmark = [pytest.mark.redis, pytest.mark.farm]

# what a slice may lose when its worker is killed outright (workers/work.py SliceStream):
# corpus entries and findings reach Redis within this, counts within PROGRESS_WINDOW
FIND_WINDOW = 2.0
PROGRESS_WINDOW = 5.0


def _farm_processes(marker: str) -> list[str]:
    """Processes whose environment holds `marker` (every farm process inherits the data
    folder in FUZZFARM_CACHE, the Redis server its guard's environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(proc.name + " " + (proc / "cmdline").read_bytes()
                             .replace(b"\0", b" ").decode(errors="replace")[:120])
        except OSError:
            continue
    return found


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _running_slice(store: FarmStore, cid: str) -> str | None:
    for s in store.campaigns.slices(store.campaigns.inflight(cid)):
        if s.state == "running":
            return s.id
    return None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["TERM", "HUP", "KILL"])
def test_up_stopped_by_a_signal_stops_everything_in_order(tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    data = tmp_path / "farm"
    cache = f"FUZZFARM_CACHE={data / 'cache'}"
    err_path = tmp_path / "up.err"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), FUZZFARM_CACHE=str(data / "cache"))
    with err_path.open("w") as err:
        up = subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", "up", "--workers", "1",
                               "--slice-seconds", "60", "--data", str(data)],
                              stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env,
                              start_new_session=True, preexec_fn=_default_sigint)
    try:
        url = str(wait_for(lambda: url_from_status(err_path.read_text()), 90,
                           "fuzzfarm up to start"))
        store = FarmStore.connect(url)
        (cid,) = [c.id for c in store.campaigns.all()]
        sid = wait_for(lambda: _running_slice(store, cid), 90, "a running slice")
        # the slice's counts reach the campaign while it runs, not when it ends
        wait_for(lambda: store.campaigns.get(cid).execs > 0, 20,
                 "the running slice's first progress report")
        time.sleep(6)  # 20 s into the slice, as a user would stop it
        execs_before = store.campaigns.get(cid).execs
        store.close()
        signalled = time.monotonic()
        up.send_signal(sig)
        if sig != signal.SIGKILL:
            wait_for(lambda: f"stopping ({sig.name})" in err_path.read_text(), 3,
                     "the stop message", poll=0.05)
            assert up.wait(timeout=30) == 128 + sig
        else:
            up.wait(timeout=5)
        wait_for(lambda: not _farm_processes(cache), 30,
                 f"every farm process to end: {_farm_processes(cache)}")
        stopped_in = time.monotonic() - signalled
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for line in _farm_processes(cache):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    print(f"{sig.name}: everything stopped {stopped_in:.1f} s after the signal")
    assert stopped_in < 20
    logs = {p.name: p.read_text(errors="replace") for p in (data / "logs").glob("*.log")}
    for name, text in logs.items():
        for bad in ("ConnectionError", "Connection refused", "Traceback"):
            assert bad not in text, (name, bad, text[-2000:])
    # the next start finds the slice in the campaign's counts and the corpus it grew
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    server = RedisServer(port, data / "redis")
    server.start()
    try:
        after = FarmStore.connect(server.url)
        s = after.campaigns.slice(sid)
        assert s is not None and s.state == "done", s
        assert s.stats is not None and s.stats["stop_reason"] == "signal 15", s.stats
        campaign = after.campaigns.get(cid)
        assert campaign is not None and campaign.execs >= max(execs_before, s.stats["execs"])
        assert campaign.paused == (sig != signal.SIGKILL)  # a SIGKILL left it running
        assert after.corpus.size("seed") >= s.stats["new_inputs"] > 0
    finally:
        server.stop()


def test_a_worker_asked_to_stop_ends_its_slice_in_seconds(farm: Farm, store: FarmStore) -> None:
    farm.worker("w1")
    cid = store.campaigns.create("seed", 1, 120)
    farm.controller()
    sid = wait_for(lambda: _running_slice(store, cid), 90, "a running slice")
    wait_for(lambda: store.campaigns.get(cid).execs > 0, 20, "a progress report")
    proc = farm.procs["w1"]
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # docker stop, systemd: Celery's warm shutdown
    proc.wait(timeout=30)
    took = time.monotonic() - asked
    s = store.campaigns.slice(sid)
    assert s is not None and s.state == "done" and s.stats["stop_reason"] == "signal 15", s
    assert took < 15, f"the worker took {took:.1f} s to stop"
    assert "Traceback" not in farm.log("w1") and "ConnectionError" not in farm.log("w1")


@pytest.mark.slow
def test_a_slice_killed_outright_loses_only_its_last_seconds(farm: Farm,
                                                             store: FarmStore) -> None:
    farm.worker("w1")
    cid = store.campaigns.create("seed", 1, 120)
    farm.controller()
    sid = wait_for(lambda: _running_slice(store, cid), 90, "a running slice")
    time.sleep(15)
    work = next(Path(farm.env["FUZZFARM_CACHE"]).glob(f"slice-{sid}-*"))
    killed = time.time()
    farm.kill9("w1")  # the worker and its pool; the job process dies with them
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"slice-{sid}-"],
                                    capture_output=True).returncode != 0, 10,
             "the job process to die with its worker")
    # what the job had written a window before the kill must be in Redis
    stats = json.loads((work / "jobs" / "job-0.json").read_text())
    slow = set(stats.get("slow_inputs", []))
    corpus = {sha256(p.read_bytes()) for p in (work / "corpus").iterdir()
              if p.stat().st_mtime < killed - FIND_WINDOW}
    missing_corpus = [s for s in corpus - slow if not store.corpus.has("seed", s)]
    # a signature is sent to triage once (again only for a clearly smaller input): each one
    # with an input written before the window must have one of its inputs sent
    sent = {sha for sha, _kernel in store.triage.waiting()} | {
        b.reproducer for b in store.buckets.all()}
    solutions = [list(folder.glob("*.elf")) for folder in (work / "solutions").iterdir()]
    solutions = [inputs for inputs in solutions if inputs]
    missing_findings = [inputs[0].parent.name for inputs in solutions
                        if min(p.stat().st_mtime for p in inputs) < killed - FIND_WINDOW
                        and not {sha256(p.read_bytes()) for p in inputs} & sent
                        and not _known_smaller(store, min(inputs, key=_size))]
    rate = stats["execs"] / max(stats["elapsed"], 1e-9)
    lost_execs = stats["execs"] - store.campaigns.get(cid).execs
    print(f"killed {stats['elapsed']:.0f} s into the slice: {len(corpus)} corpus entries and "
          f"{len(solutions)} signatures, missing "
          f"{len(missing_corpus)} and {len(missing_findings)}; {lost_execs:,} execs of "
          f"{stats['execs']:,} not counted ({lost_execs / rate:.1f} s of fuzzing)")
    assert corpus and solutions
    assert missing_corpus == [] and missing_findings == []
    assert lost_execs <= rate * PROGRESS_WINDOW
    # the controller replaces the lost slice (by Redis's clock) and the work goes on
    farm.worker("w2")
    wait_for(lambda: store.stats.counters().get("slices_lost", 0) == 1, 60,
             "the controller to declare the slice lost")
    assert store.campaigns.slice(sid).state == "lost"
    new = wait_for(lambda: _running_slice(store, cid), 90, "the replacement slice")
    assert new != sid


def _size(path: Path) -> int:
    return path.stat().st_size


def _known_smaller(store: FarmStore, path: Path) -> bool:
    """A finding not sent because the farm already had a clearly smaller reproducer (the
    folder name is the bucket id)."""
    size = store.buckets.smallest_sizes([path.parent.name]).get(path.parent.name)
    return size is not None and size < path.stat().st_size
