"""The guard `fuzzfarm up` runs its Redis under: asked to stop, it waits for the farm's workers
and controller to close their connections, and for no other client (a status reader has no
report to finish)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers.conftest import ROOT
from workers.local import free_port, wait_for_redis
from workers.redis_server import find_server
from workers.store import FarmStore

pytestmark = pytest.mark.redis


def _guarded_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port(0)
    data = tmp_path / "redis"
    data.mkdir()
    url = f"redis://127.0.0.1:{port}/0"
    command = [sys.executable, "-m", "workers.redis_guard", "--",
               *find_server().command(port, data)]
    guard = subprocess.Popen(command, cwd=ROOT, env={"REDIS_URL": url, "PATH": "/usr/bin:/bin",
                                                     "FUZZFARM_REDIS_STOP_WAIT": "60"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_redis(url)
    return guard, url


def _stopped_within(guard: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        guard.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_guard_waits_for_a_worker_but_not_for_a_reader(tmp_path: Path) -> None:
    guard, url = _guarded_server(tmp_path)
    worker, reader = FarmStore.connect(url, "worker"), FarmStore.connect(url, "cli")
    try:
        worker.ping()
        reader.ping()
        assert reader.clients(("worker", "controller")) == 1
        assert reader.clients() >= 2
        guard.send_signal(signal.SIGTERM)
        # the worker still has its report to send: the server stays up for it
        assert not _stopped_within(guard, 3.0)
        worker.campaigns.server_time()  # its last report
        worker.close()
        closed = time.monotonic()
        # the reader's open connection does not hold the stop up
        assert _stopped_within(guard, 20.0)
        assert time.monotonic() - closed < 10.0
        assert guard.returncode == 0, guard.stderr.read() if guard.stderr else ""
    finally:
        reader.close()
        worker.close()
        if guard.poll() is None:
            guard.kill()
            guard.wait()
