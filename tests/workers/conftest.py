"""Real Redis servers and real Celery worker processes for the farm's tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workers.kernels import ensure_builtin
from workers.redis_server import farm_password, find_server, write_config
from workers.store import FarmStore, wait_until_up

ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """The server `fuzzfarm up` would start: a redis-server on PATH, else the embedded one,
    with its password kept in `data` (the one found there, else a new one)."""

    port: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str:
        return farm_password(self.data)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        config = write_config(self.data, self.password)
        proc = self.proc = subprocess.Popen(
            find_server().command(self.port, self.data, config),
            stdout=(self.data / "redis.log").open("a"), stderr=subprocess.STDOUT)

        def running() -> None:
            assert proc.poll() is None, f"Redis exited with {proc.returncode}"

        assert wait_until_up(self.url, 15, running, poll=0.1), "Redis did not start"

    def cli(self, *args: str) -> str:
        """A command through the server's own command-line client, as an operator runs it."""
        cli = find_server().cli
        assert cli is not None, "the Redis server has no command-line client beside it"
        env = {**os.environ, "REDISCLI_AUTH": self.password, "VALKEYCLI_AUTH": self.password}
        out = subprocess.run([str(cli), "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=30, check=True, env=env).stdout
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis fsyncs its AOF and exits
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running_redis(data: Path) -> Iterator[RedisServer]:
    """A Redis server of its own on a free port, its data (and password) in `data`, stopped
    on leaving."""
    data.mkdir(parents=True, exist_ok=True)
    server = RedisServer(_free_port(), data)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def store(redis_server: RedisServer) -> FarmStore:
    s = FarmStore.connect(redis_server.url)
    ensure_builtin(s)
    return s


@dataclass
class Farm:
    """Worker and controller processes started as `fuzzfarm up` starts them."""

    url: str
    tmp: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("a")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        from workers.local import worker_command

        return self.start(name, worker_command(name))

    def controller(self) -> subprocess.Popen[bytes]:
        return self.start("controller", [sys.executable, "-m", "workers.controller"])

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its pool children
        proc.wait()

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def farm_env(url: str, cache: Path) -> dict[str, str]:
    """The environment of the test farm's processes: short slices and graces."""
    env = dict(os.environ)
    env.update({"REDIS_URL": url, "FUZZFARM_SLICE_SECONDS": "6",
                "FUZZFARM_VISIBILITY_TIMEOUT": "20", "FUZZFARM_LOST_GRACE": "8",
                "FUZZFARM_CACHE": str(cache), "FUZZFARM_MINIMIZE_EXECUTIONS": "1500",
                # a few seconds of QEMU per bucket: only the test of crosschecks turns them on
                "FUZZFARM_CROSSCHECK": "0",
                "PYTHONPATH": str(ROOT)})
    return env


@pytest.fixture
def farm(redis_server: RedisServer, tmp_path: Path) -> Iterator[Farm]:
    f = Farm(redis_server.url, tmp_path, farm_env(redis_server.url, tmp_path / "cache"))
    yield f
    f.stop()


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             poll: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}"
        time.sleep(poll)
