"""The docker-compose topology, run as plain processes: each service's command and health
check, with the environment Compose would give it and nothing else, on one machine.

Only what a container would differ in is changed: Redis is at 127.0.0.1 on a free port
instead of `redis:6379`, the two worker replicas get different names (in containers their
hostnames differ), the dashboard listens on the loopback on a free port, and the processes
find the venv's `fuzzfarm` on PATH as the image has it in /usr/local/bin."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.deploy.compose import TEST_ENV, command, healthcheck_argv, load, service_env
from workers.redis_server import find_server
from workers.store import FarmStore

pytestmark = [pytest.mark.redis, pytest.mark.farm, pytest.mark.slow]

REPLICAS = 2
SEED_BUG_FIELD = "segments[0].vaddr"  # the loaded vaddr that came out as 0x300028
BUG_TIMEOUT = 180.0
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition: Callable[[], Any], timeout: float, what: str,
              check: Callable[[], None] = lambda: None, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        check()
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}"
        time.sleep(poll)


def _local_url(url: str, port: int) -> str:
    parts = urlsplit(url)
    assert parts.hostname == "redis", url
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(option) + 1] = value
    return out


@dataclass
class Topology:
    tmp: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        # what the images provide besides the service's environment: a PATH with the
        # project's entry points and the Redis image's redis-server and redis-cli (here the
        # server the farm would start itself), a HOME
        tools = self.tmp / "redis-image-bin"
        if not tools.exists():
            tools.mkdir()
            server = find_server()
            assert server.cli is not None, f"no client beside {server.server}"
            # the server notes the arguments it was started with before running: it soon
            # overwrites them with its title in /proc/PID/cmdline
            wrapper = tools / "redis-server"
            wrapper.write_text(f'#!/bin/sh\necho "$*" >> {self.tmp / "redis-argv"}\n'
                               f'exec {server.server} "$@"\n')
            wrapper.chmod(0o755)
            (tools / "redis-cli").symlink_to(server.cli)
        return {"PATH": f"{VENV_BIN}:{tools}:/usr/bin:/bin", "HOME": str(home),
                "VIRTUAL_ENV": str(VENV_BIN.parent)}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        exe = shutil.which(argv[0], path=env["PATH"])
        assert exe, f"{name}: {argv[0]} not found"
        self.procs[name] = subprocess.Popen([exe, *argv[1:]], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=env["HOME"], start_new_session=True)
        log.close()

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, (f"{name} exited with {proc.returncode}:\n"
                                         f"{self.log(name)[-3000:]}")

    def stop(self) -> None:
        # the farm first, Redis last (as `docker-compose down` would, by dependency)
        order = [n for n in self.procs if n != "redis"] + (["redis"] if "redis" in self.procs
                                                           else [])
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    t = Topology(tmp_path)
    try:
        yield t
    finally:
        t.stop()


def _group(pgid: int) -> list[int]:
    """The processes of a service (each was started in a session, and group, of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or one that exited meanwhile
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _health(kind: str, argv: list[str], env: dict[str, str], cwd: str) -> None:
    cmd = ["/bin/sh", "-c", argv[0]] if kind == "CMD-SHELL" else [
        shutil.which(argv[0], path=env["PATH"]) or argv[0], *argv[1:]]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    assert run.returncode == 0, f"health check {argv} failed: {run.stdout}{run.stderr}"


def _seed_bug_buckets(store: FarmStore) -> list[str]:
    found = []
    for bucket in store.buckets.all():
        report = store.reports.get(bucket.reproducer, bucket.kernel) or {}
        if any(f.get("field") == SEED_BUG_FIELD for f in report.get("findings", [])):
            found.append(bucket.id)
    return found


def test_the_compose_services_as_processes_find_the_seed_bug(topology: Topology,
                                                             tmp_path: Path) -> None:
    variables = dict(TEST_ENV, FUZZFARM_SLICE_SECONDS="8", FUZZFARM_CACHE=str(tmp_path / "cache"))
    services = load(variables)["services"]
    base = topology.base_env()
    redis_port, dashboard_port = _free_port(), _free_port()

    # redis: the service's own arguments, plus what the container gives it implicitly
    data = tmp_path / "redis-data"
    data.mkdir()
    redis_service = services["redis"]
    # its TMPDIR: the container's /tmp is a tmpfs of its own
    redis_env = {**base, **service_env(redis_service), "TMPDIR": str(tmp_path)}
    topology.start("redis", [*command(redis_service), "--port", str(redis_port),
                             "--bind", "127.0.0.1", "--dir", str(data)], redis_env)
    kind, argv = healthcheck_argv(redis_service)
    assert kind == "CMD-SHELL"
    local_check = argv[0].replace("redis-cli", f"redis-cli -p {redis_port}")
    _wait_for(lambda: subprocess.run(["/bin/sh", "-c", local_check], env=redis_env,
                                     capture_output=True).returncode == 0, 20,
              "the redis health check to pass", topology.check_alive)

    def env_of(service: dict[str, Any]) -> dict[str, str]:
        env = service_env(service)
        env["REDIS_URL"] = _local_url(env["REDIS_URL"], redis_port)
        return {**base, **env}

    url = env_of(services["worker"])["REDIS_URL"]
    unauthenticated = redis.Redis(port=redis_port, socket_connect_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        unauthenticated.ping()  # requirepass is in force
    # ... from a private file named first on the server's command line, not from the line
    password = TEST_ENV["REDIS_PASSWORD"]
    argv = (tmp_path / "redis-argv").read_text().splitlines()[-1].split()
    assert password not in argv
    config = Path(argv[0])
    assert config.parent == tmp_path and stat.S_IMODE(config.stat().st_mode) == 0o600
    assert f"requirepass {password}" in config.read_text()

    worker_argv = command(services["worker"])
    node = worker_argv[worker_argv.index("--name") + 1]
    names = [f"{node}{i}" for i in range(1, REPLICAS + 1)]
    for name in names:
        topology.start(name, _replace_option(worker_argv, "--name", name),
                       env_of(services["worker"]))
    topology.start("controller", command(services["controller"]),
                   env_of(services["controller"]))
    dashboard_argv = _replace_option(command(services["dashboard"]), "--port",
                                     str(dashboard_port))
    # the container listens on all its interfaces; on a shared machine, the loopback
    topology.start("dashboard", _replace_option(dashboard_argv, "--host", "127.0.0.1"),
                   env_of(services["dashboard"]))

    store = FarmStore.connect(url)
    started = time.monotonic()
    campaigns = _wait_for(lambda: [c for c in store.campaigns.all() if c.state == "running"],
                          60, "the controller to start the configured campaign",
                          topology.check_alive)
    controller_env = service_env(services["controller"])
    (campaign,) = campaigns
    assert campaign.kernel == controller_env["FUZZFARM_CAMPAIGN"]
    assert campaign.slices == int(controller_env["FUZZFARM_CAMPAIGN_SLICES"])

    def healthz() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/healthz",
                                        timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    _wait_for(healthz, 90, "the dashboard's /healthz to answer 200", topology.check_alive)

    bugs = _wait_for(lambda: _seed_bug_buckets(store), BUG_TIMEOUT,
                     f"a bucket whose report has {SEED_BUG_FIELD}", topology.check_alive,
                     poll=2.0)
    print(f"seed bug bucketed {time.monotonic() - started:.0f} s after the farm started: "
          f"{bugs}")
    # both replicas took part, each under its own node name
    heartbeats = set(store.stats.workers())
    for name in names:
        assert any(w.startswith(f"{name}@") for w in heartbeats), (name, heartbeats)

    # the dashboard's coverage button: a task for the workers, which take the coverage queue
    request = urllib.request.Request(
        f"http://127.0.0.1:{dashboard_port}/coverage/seed/sample", data=b"", method="POST",
        headers={"X-Fuzzfarm-Token": TEST_ENV["FUZZFARM_DASHBOARD_TOKEN"]})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert "notice=sample" in response.url and "busy" not in response.url
    _wait_for(lambda: (store.coverage.job("seed") or {}).get("state") == "done", 180,
              "a worker to sample the coverage", topology.check_alive, poll=2.0)
    record = store.coverage.record("seed")
    assert record is not None and record["inputs"] > 0 and record["blocks"]

    # every app service's health check passes against the running farm
    hostname = socket.gethostname()
    kind, argv = healthcheck_argv(services["worker"])
    for name in names:
        script = argv[0].replace(f"{node}@$HOSTNAME", f"{name}@$HOSTNAME")
        assert script != argv[0]
        _health(kind, [script], {**env_of(services["worker"]), "HOSTNAME": hostname},
                base["HOME"])
    kind, argv = healthcheck_argv(services["controller"])
    _health(kind, argv, env_of(services["controller"]), base["HOME"])
    kind, argv = healthcheck_argv(services["dashboard"])
    _health(kind, [a.replace("127.0.0.1:8000", f"127.0.0.1:{dashboard_port}") for a in argv],
            env_of(services["dashboard"]), base["HOME"])
    topology.check_alive()
    assert store.stats.counters().get("harness_errors", 0) == 0
    for name, proc in topology.procs.items():
        assert "Traceback" not in topology.log(name), topology.log(name)[-3000:]
        # no service shows the password: not on its command line, not in its log
        assert password not in topology.log(name), name
        for pid in _group(proc.pid):
            assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), name
