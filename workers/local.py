"""`fuzzfarm up`: the whole farm on one machine, as separate processes — a Redis server (unless
one is given), N Celery workers, the controller and the dashboard — configured only through the
environment variables the docker-compose file sets, so both run the same topology."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kernel_emu import qemu
from workers.app import worker_queues
from workers.kernels import ensure_builtin
from workers.redis_server import (
    PASSWORD_FILE,
    PasswordError,
    ServerNotFound,
    farm_password,
    find_server,
    write_config,
)
from workers.settings import Settings, redact_url
from workers.store import FarmStore, StoreError, wait_until_up

DEFAULT_REDIS_PORT = 6379
PR_SET_PDEATHSIG = 1
STOP_WAIT = 30.0
SERVER_STOP_WAIT = 90.0  # the Redis guard waits for the last clients, then for the AOF


class FarmError(Exception):
    """The local farm could not be started (one line for the user)."""


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise FarmError("no free TCP port on 127.0.0.1")


def wait_for_redis(url: str, timeout: float = 15.0,
                   alive: Callable[[], str | None] | None = None) -> None:
    """Until Redis at `url` answers PING; `alive` names why a server we started is gone."""

    def check() -> None:
        if alive is not None and (why := alive()):
            raise FarmError(why)

    if not wait_until_up(url, timeout, check):
        raise FarmError(f"Redis at {redact_url(url)} did not answer within {timeout:.0f} s")


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: TextIO


@dataclass
class LocalFarm:
    data: Path
    workers: int
    kernel: str = "seed"
    redis_url: str | None = None
    slice_seconds: float = 60.0
    first_slice_seconds: float = 0.0  # a new campaign's first slices (0: as long as the others)
    dashboard_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    url: str = ""

    def env(self) -> dict[str, str]:
        # the farm's processes learn the Redis password here, in their environment, which
        # only this user can read (/proc/PID/environ), never from their command lines
        env = dict(os.environ)
        env.update(self.extra_env)
        env["REDIS_URL"] = self.url
        env.setdefault("FUZZFARM_SLICE_SECONDS", str(self.slice_seconds))
        env.setdefault("FUZZFARM_CACHE", str(self.data / "cache"))
        return env

    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        logs = self.data / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / f"{name}.log").open("a")
        # own sessions: a Ctrl-C reaches only `fuzzfarm up`, which stops the rest in order
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=self.env(),
                                 start_new_session=True, preexec_fn=_stop_with_parent)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start(self, say: Callable[[str], None] = lambda _line: None) -> FarmStore:
        """Start Redis (unless given one), the workers, the controller and the dashboard,
        saying what it does and waits for."""
        self.data.mkdir(parents=True, exist_ok=True)
        if self.redis_url:
            self.url = self.redis_url
            say(f"Redis: the one at {redact_url(self.url)} (--redis-url / REDIS_URL)")
            wait_for_redis(self.url)
        else:
            try:
                server = find_server()
            except ServerNotFound as e:
                raise FarmError(str(e)) from None
            folder = self.data / "redis"
            folder.mkdir(mode=0o700, exist_ok=True)
            try:
                password = farm_password(folder)
                config = write_config(folder, password)
            except PasswordError as e:
                raise FarmError(str(e)) from None
            port = free_port(DEFAULT_REDIS_PORT)
            self.url = f"redis://:{password}@127.0.0.1:{port}/0"
            say(f"Redis: starting {server.describe()} on 127.0.0.1:{port}, "
                f"data in {folder}, its password in {folder / PASSWORD_FILE}")
            proc = self._spawn("redis", guarded(server.command(port, folder, config)))
            log = self.data / "logs" / "redis.log"
            wait_for_redis(self.url, alive=lambda: None if proc.popen.poll() is None else (
                f"the Redis server exited at start ({_log_tail(log)}); see {log}"))
        store = FarmStore.connect(self.url, "up")
        ensure_builtin(store)
        say(f"starting {self.workers} worker(s) and the controller")
        why = qemu.missing() if Settings.from_env().crosscheck else "FUZZFARM_CROSSCHECK=0"
        say("buckets are crosschecked on QEMU + OVMF" if why is None else
            f"buckets are not crosschecked on real firmware: {why}")
        for i in range(self.workers):
            self._spawn(f"worker-{i}", worker_command(f"worker{i}"))
        self._spawn("controller", [sys.executable, "-m", "workers.controller"])
        if self.dashboard_port is not None:
            port = free_port(self.dashboard_port)
            if port != self.dashboard_port:
                say(f"port {self.dashboard_port} is taken: the dashboard uses {port}")
            self.dashboard_port = port
            self._spawn("dashboard", [sys.executable, "-m", "dashboard", "--port", str(port)])
        return store

    def url_for_shell(self) -> str:
        """REDIS_URL as the user may paste it into a shell: the password of a server this
        farm started is read from its file there, so it is never printed."""
        if self.redis_url:
            return redact_url(self.url)
        password = shlex.quote(str(self.data / "redis" / PASSWORD_FILE))
        host = self.url.rsplit("@", 1)[1]
        return f"redis://:$(cat {password})@{host}"

    def wait_ready(self, store: FarmStore, say: Callable[[str], None],
                   timeout: float = 120.0) -> None:
        """Until every worker has reported and the dashboard answers, saying what is missing;
        a farm process that exits meanwhile is an error."""
        import urllib.request

        def dashboard_up() -> bool:
            if self.dashboard_port is None:
                return True
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.dashboard_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        said = ""
        while True:
            if dead := self.dead():
                raise FarmError(f"farm process(es) exited: {', '.join(dead)} "
                                f"(see {self.data / 'logs'})")
            seen = len(store.stats.workers())
            web = dashboard_up()
            if seen >= self.workers and web:
                return
            waiting = [f"workers {seen}/{self.workers}"] if seen < self.workers else []
            waiting += [] if web else ["the dashboard"]
            line = "waiting for " + " and ".join(waiting)
            if line != said:
                say(line)
                said = line
            if time.monotonic() > deadline:
                say(f"still {line} after {timeout:.0f} s; carrying on (see "
                    f"{self.data / 'logs'})")
                return
            time.sleep(0.5)

    def ensure_campaign(self, store: FarmStore) -> str:
        """The running campaign on the kernel build; else the last one this farm's own stop
        paused, resumed (its execs and corpus carry on); else a new one."""
        campaigns = [c for c in store.campaigns.all() if c.kernel == self.kernel]
        for c in campaigns:
            if c.state == "running":
                return c.id
        paused = [c for c in campaigns if c.paused]
        if paused:
            last = max(paused, key=lambda c: c.created)
            store.campaigns.set_state(last.id, "running")
            return last.id
        return store.campaigns.create(self.kernel, self.workers, self.slice_seconds,
                                      self.first_slice_seconds)

    def kill_all(self, store: FarmStore | None = None) -> None:
        """The second Ctrl-C: stop everything now (Redis still gets a SIGTERM to write its
        AOF; unacknowledged tasks are delivered again later)."""
        if store is not None:
            with contextlib.suppress(StoreError):
                store.close()
        for p in self.procs:
            if p.name != "redis" and p.popen.poll() is None:
                _kill(p)
        for p in self.procs:
            if p.name == "redis":
                _terminate(p)
            if not p.log.closed:
                p.log.close()

    def dead(self) -> list[str]:
        return [p.name for p in self.procs if p.popen.poll() is not None]

    def stop(self, store: FarmStore | None,
             say: Callable[[str], None] = lambda _line: None) -> None:
        """Stop in order: campaigns (slices end within seconds and report), workers,
        controller, dashboard, and last Redis, which writes its AOF. Says what it waits for."""
        if store is not None:
            try:
                for c in store.campaigns.all():
                    if c.state == "running":
                        store.campaigns.set_state(c.id, "stopping", paused=True)
                deadline = time.monotonic() + STOP_WAIT
                last: tuple[int, float] = (0, 0.0)  # what was said last, and when
                while (running := sum(_slices_running(store, c.id)
                                      for c in store.campaigns.active())):
                    now = time.monotonic()
                    if now >= deadline:
                        say(f"{running} slice(s) did not report within {STOP_WAIT:.0f} s; "
                            f"stopping the workers anyway")
                        break
                    if running != last[0] or now - last[1] >= 5.0:
                        say(f"waiting for {running} running slice(s) to report "
                            f"({deadline - now:.0f} s left)")
                        last = (running, now)
                    time.sleep(0.5)
            except StoreError as e:
                say(f"Redis unavailable while stopping: {e}")
            finally:
                store.close()  # the guard stops Redis once every client has left
        others = [p for p in self.procs if p.name != "redis" and p.popen.poll() is None]
        if others:
            say("stopping " + ", ".join(p.name for p in others))
        for p in others:
            _terminate(p)
        for p in self.procs:
            if p.name == "redis" and p.popen.poll() is None:
                say("stopping Redis (it writes its append-only file)")
                _terminate(p, wait=SERVER_STOP_WAIT)
        for p in self.procs:
            p.log.close()


def guarded(server_command: list[str]) -> list[str]:
    """The server under the guard that stops it last (workers/redis_guard.py)."""
    return [sys.executable, "-m", "workers.redis_guard", "--", *server_command]


def _stop_with_parent() -> None:
    """In each farm process, before exec: if `fuzzfarm up` dies without stopping it (killed,
    say), the kernel sends it SIGTERM, so no orphaned farm keeps running."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _slices_running(store: FarmStore, cid: str) -> int:
    campaigns = store.campaigns
    return sum(s.state == "running" for s in campaigns.slices(campaigns.inflight(cid)))


def _terminate(p: Proc, wait: float = 10.0) -> None:
    """SIGTERM (a Celery worker finishes its task), then SIGQUIT (a worker stops at once; its
    unacknowledged task goes back to the queue), then SIGKILL for the whole process group."""
    for sig in (signal.SIGTERM, signal.SIGQUIT):
        if p.popen.poll() is not None:
            return
        p.popen.send_signal(sig)
        try:
            p.popen.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    _kill(p)


def _kill(p: Proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.popen.pid, signal.SIGKILL)  # its own session: the worker and its children
    p.popen.wait()


def worker_command(name: str, queues: str | None = None) -> list[str]:
    """A worker consuming `queues` (comma-separated; by default all the farm's queues, the
    crosscheck queue only where QEMU and OVMF are installed)."""
    queues = queues or ",".join(worker_queues())
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
            "-c", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "INFO"]


def url_from_status(text: str) -> str | None:
    """The Redis URL in what `fuzzfarm up` wrote (its "in another shell: REDIS_URL=…" line),
    with the password read from its file, as the shell would; for programs that drive `up`."""
    m = re.search(r"REDIS_URL=(.+?) fuzzfarm status", text)
    if m is None:
        return None
    url = m.group(1)
    cat = re.search(r"\$\(cat (.+?)\)", url)
    if cat is None:
        return url
    password = Path(shlex.split(cat.group(1))[0]).read_text().strip()
    return url[:cat.start()] + password + url[cat.end():]


class ExecRate:
    """Execs per second over the last WINDOW seconds of status lines: slices report their
    counts every few seconds, so the rate between two lines a second apart would jump."""

    WINDOW = 15.0

    def __init__(self) -> None:
        self._seen: deque[tuple[float, int]] = deque()

    def update(self, execs: int) -> float:
        now = time.monotonic()
        seen = self._seen
        if seen and execs < seen[-1][1]:
            seen.clear()  # another campaign, or a restarted count
        seen.append((now, execs))
        while len(seen) > 2 and now - seen[1][0] >= self.WINDOW:
            seen.popleft()
        (t0, e0), (t1, e1) = seen[0], seen[-1]
        return (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0


def status_line(store: FarmStore, started: float, rate: ExecRate | None = None) -> str:
    campaigns = [c for c in store.campaigns.all() if c.state in ("running", "stopping")]
    execs = sum(c.execs for c in campaigns)
    per_second = (rate or ExecRate()).update(execs)
    buckets = store.buckets.all()
    by_class = Counter(b.crash_class for b in buckets)
    minimized = sum(1 for b in buckets if b.minimized)
    found = ", ".join(f"{k} {v}" for k, v in sorted(by_class.items())) or "none yet"
    return (f"[{time.monotonic() - started:5.0f}s] workers {len(store.stats.workers())} · execs "
            f"{execs:,} ({per_second:,.0f}/s) · buckets {len(buckets)} ({minimized} minimized): "
            f"{found}")
