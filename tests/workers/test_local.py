"""`fuzzfarm up`'s own Redis, run as a user runs it: its password is made on first start, kept
private beside the data and used again, and shows on no command line, in no message and in no
log of the farm's processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.workers.conftest import ROOT, wait_for
from workers.local import url_from_status
from workers.redis_server import find_server
from workers.store import FarmStore

pytestmark = [pytest.mark.redis, pytest.mark.farm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every process of the machine: pid -> (parent pid, command line)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        out[int(entry.name)] = (ppid, cmdline)
    return out


def _descendants(root: int, procs: dict[int, tuple[int, bytes]]) -> set[int]:
    found = {root}
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        if not more:
            return found - {root}
        found |= more


def _recording_server(folder: Path) -> Path:
    """A `redis-server` for PATH that writes down the arguments it was started with, then runs
    the server the farm would: the server itself soon overwrites them in /proc/PID/cmdline
    with its title, so that alone would not show what `ps` saw at first."""
    folder.mkdir()
    script = folder / "redis-server"
    script.write_text(f'#!/bin/sh\necho "$*" >> {folder / "argv"}\n'
                      f'exec {find_server().server} "$@"\n')
    script.chmod(0o755)
    return folder


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc/net."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # exited
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile (the listing's own, for one)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table, size in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            # /proc/net shows addresses as 32-bit words in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(socket.AF_INET if size == 8 else socket.AF_INET6,
                                           words), int(port, 16)))
    return found


def _up(data: Path, err: Path, *args: str, path: Path | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("REDIS_URL", None)
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    with err.open("w") as stream:
        return subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", "up", "--workers", "1",
                                 "--slice-seconds", "5", "--data", str(data), *args],
                                stdout=subprocess.DEVNULL, stderr=stream, cwd=ROOT, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_up_keeps_its_redis_password_private(tmp_path: Path) -> None:
    data, err = tmp_path / "farm", tmp_path / "up.err"
    server = _recording_server(tmp_path / "bin")
    up = _up(data, err, "--port", str(_free_port()), path=server)
    try:
        url = str(wait_for(lambda: url_from_status(err.read_text()), 120,
                           "fuzzfarm up to say how to reach its Redis"))
        password = (data / "redis" / "password").read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", password)
        for path, mode in ((data / "redis", 0o700), (data / "redis" / "password", 0o600),
                           (data / "redis" / "redis.conf", 0o600)):
            assert stat.S_IMODE(path.stat().st_mode) == mode, path
        assert f"redis://:{password}@127.0.0.1:" in url
        procs = _processes()
        farm = {pid: procs[pid][1] for pid in _descendants(up.pid, procs)}
        seen = b"\n".join(farm.values())
        for part in (b"-server", b"celery", b"workers.controller", b"-m\0dashboard"):
            assert part in seen, (part, seen)
        for pid, (_, cmdline) in procs.items():
            assert password.encode() not in cmdline, (pid, cmdline)
        version, started = (server / "argv").read_text().splitlines()
        argv = started.split()
        assert version == "--version" and password not in started
        assert argv[0] == str(data / "redis" / "redis.conf")
        assert argv[argv.index("--bind") + 1] == "127.0.0.1"
        # what the farm's processes learn it from: their environment, private to this user
        # Redis and the dashboard listen on the loopback only, and nothing else listens
        listening = _listening(set(farm))
        assert len(listening) >= 2 and {a for a, _ in listening} <= {"127.0.0.1", "::1"}, \
            listening
        controller = next(pid for pid, cmd in farm.items() if b"workers.controller" in cmd)
        assert f"REDIS_URL={url}\0".encode() in Path(f"/proc/{controller}/environ").read_bytes()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_connect_timeout=2).ping()
        FarmStore.connect(url).ping()
        status = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "status"], cwd=ROOT,
                                env=dict(os.environ, REDIS_URL=url), capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert f"Redis redis://:***@127.0.0.1:{port}/0" in status.stdout
        assert password not in status.stdout + status.stderr
        up.send_signal(signal.SIGINT)  # Ctrl-C: the farm stops in order
        assert up.wait(timeout=240) == 130
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    said = err.read_text()
    assert "in another shell: REDIS_URL=redis://:$(cat " in said and "Traceback" not in said
    logs = {p.name: p.read_text(errors="replace") for p in (data / "logs").glob("*.log")}
    assert {"redis.log", "worker-0.log", "controller.log", "dashboard.log"} <= set(logs)
    for name, text in [("stderr", said), *logs.items()]:
        assert password not in text, name
    # Celery's banner names the broker, with the password masked
    (transport,) = [line for line in logs["worker-0.log"].splitlines() if "transport:" in line]
    assert f":**@127.0.0.1:{port}/0" in transport
    assert "controller started on redis://:***@127.0.0.1" in logs["controller.log"]

    # the next start uses the same password, and the data it protects
    started = time.monotonic()
    again = _up(data, err, "--seconds", "1")
    assert again.wait(timeout=240) == 0, err.read_text()
    assert (data / "redis" / "password").read_text().strip() == password
    assert "Traceback" not in err.read_text() and password not in err.read_text()
    print(f"second start and stop: {time.monotonic() - started:.0f} s")


def test_workers_take_crosschecks_only_where_qemu_and_ovmf_are(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kernel_emu import qemu
    from workers.app import QUEUES, worker_queues
    from workers.local import worker_command

    monkeypatch.setenv("FUZZFARM_OVMF", str(tmp_path / "absent.fd"))
    assert "crosscheck" not in worker_queues()
    assert worker_queues() == tuple(q for q in QUEUES if q != "crosscheck")
    command = worker_command("w")
    assert command[command.index("-Q") + 1] == "fuzz,triage,minimize,coverage"
    if qemu.missing() is None:
        monkeypatch.delenv("FUZZFARM_OVMF")
        assert worker_queues() == QUEUES
