"""Every way of stopping the farm is Ctrl-C: `fuzzfarm up` stopped by SIGTERM, SIGHUP or even
SIGKILL stops its slices, workers, controller and Redis in order and leaves nothing running,
and a worker told to stop ends its slice in seconds. A worker killed outright mid-slice, which
loses only its slice's last seconds, is one of the faults of `test_faults.py`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers.conftest import ROOT, Farm, RedisServer, wait_for
from workers.local import url_from_status
from workers.store import FarmStore

pytestmark = [pytest.mark.redis, pytest.mark.farm]


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
