"""The newcomer's path: a clean clone, the README's two commands, and a PATH with no Redis
server on it. `make up` must set itself up, start the embedded server, show the seed bug on
the dashboard and leave nothing running after Ctrl-C; `make test` must set itself up and pass
with the same PATH (here on one test module, to keep the run short)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.paths import path_without

ROOT = Path(__file__).parents[1]
SERVERS = ("redis-server", "valkey-server", "redis-cli", "valkey-cli")
SETUP_TIMEOUT = 900.0  # a virtualenv from pip's cache, the native hooks, the farm's start
BUG_TIMEOUT = 120.0  # the promise: the seed bug on the dashboard within two minutes
SEED_BUG = "segments[0].vaddr"
# past the default per-test limit: the setup, then the farm's run and stop, or the tests
TEST_TIMEOUT = SETUP_TIMEOUT + 600

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]


def _newcomer_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MFLAGS",
                        "MAKELEVEL", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env["PATH"] = path_without(tmp / "path", SERVERS)
    return env


def _default_sigint() -> None:
    # a child of a background job starts with SIGINT ignored; a terminal's Ctrl-C must work
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _processes_under(folder: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def _wait(until: Callable[[], Any], timeout: float, what: str, alive: subprocess.Popen,
          log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = until()
        if value:
            return value
        assert alive.poll() is None, f"exited with {alive.returncode} {what}:\n" \
                                     f"{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, \
            f"timed out after {timeout:.0f} s {what}:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(1.0)


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode(errors="replace")
    except OSError:
        return ""


def _seed_bug_shown(dashboard: str) -> bool:
    """A bucket page shows the seed bug: segment 0's vaddr as the finding or as the
    consequence of the heap corruption that causes it."""
    listing = _get(dashboard + "buckets")
    if SEED_BUG in listing:
        return True
    return any(SEED_BUG in _get(dashboard + f"bucket/{bid}")
               for bid in dict.fromkeys(re.findall(r'href="/bucket/([0-9a-f]{16})"', listing)))


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("newcomer") / "rustux-fuzzfarm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True,
                   timeout=120)
    return where


@pytest.mark.redis
@pytest.mark.farm
def test_make_up_from_a_clean_clone_shows_the_seed_bug_and_stops_cleanly(
        clone: Path, tmp_path: Path) -> None:
    env = _newcomer_env(tmp_path)
    log = tmp_path / "make-up.log"
    started = time.monotonic()
    with log.open("w") as out:
        make = subprocess.Popen(["make", "up"], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
    try:
        m = _wait(lambda: re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", log.read_text()),
                  SETUP_TIMEOUT, "before the dashboard came up", make, log)
        dashboard = m.group(1)
        ready = time.monotonic()
        _wait(lambda: _seed_bug_shown(dashboard), BUG_TIMEOUT,
              f"before the dashboard showed a bucket with {SEED_BUG}", make, log)
        found = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: the terminal signals make and the farm
        make.wait(timeout=120)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    text = log.read_text()
    print(f"clone to dashboard {ready - started:.0f} s, to the seed bug on it "
          f"{found - started:.0f} s")
    assert "embedded Valkey" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # what `make up` said while it waited
    for step in ("setting up .venv", "building the native hooks", "Redis: starting",
                 "worker(s)", "dashboard: http://"):
        assert step in text, (step, text[-3000:])
    # nothing the farm started outlives it
    deadline = time.monotonic() + 30
    while (left := _processes_under(clone)) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not left, left


@pytest.mark.redis  # the embedded one, which tests/workers/test_store.py starts
def test_make_test_from_a_clean_clone_passes_without_a_redis_server(
        clone: Path, tmp_path: Path) -> None:
    env = _newcomer_env(tmp_path)
    run = subprocess.run(["make", "test", "PYTEST_ARGS=-q tests/workers/test_store.py"],
                         cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=SETUP_TIMEOUT, preexec_fn=_default_sigint)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-3000:]
    assert "failed" not in run.stdout, run.stdout[-3000:]
