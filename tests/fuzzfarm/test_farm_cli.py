"""The farm commands' output: `fuzzfarm up`'s status line on a terminal, a pipe and a stderr
that went away; the `buckets` and `status` tables, run as a user runs them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzzfarm.farm_cli import StatusOutput
from tests.workers.conftest import ROOT, _free_port, running_redis
from workers.store import FarmStore

LONG_SIGNATURE = ("vaddr-corruption | rustux::loader::elf::load_segments < "
                  "rustux::loader::elf::load < rustux::loader::load_init | segments[0].vaddr")


def test_a_pipe_gets_plain_status_lines() -> None:
    stream = io.StringIO()
    out = StatusOutput(stream)
    out.say("starting 1 worker(s)")
    out.status("[    1s] workers 1 · execs 0 (0/s)")
    out.status("[   11s] workers 1 · execs 5,000 (500/s)")
    out.end_status()
    out.say("stopping")
    assert out.every == 10.0
    assert stream.getvalue().splitlines() == [
        "fuzzfarm: starting 1 worker(s)", "[    1s] workers 1 · execs 0 (0/s)",
        "[   11s] workers 1 · execs 5,000 (500/s)", "fuzzfarm: stopping"]


def _read_until(fd: int, end: str, timeout: float = 10.0) -> str:
    """What a terminal received, up to `end` (the pty hands it over asynchronously)."""
    got = b""
    deadline = time.monotonic() + timeout
    while end.encode() not in got:
        assert time.monotonic() < deadline, f"no {end!r} in {got!r}"
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            got += os.read(fd, 65536)
    return got.decode(errors="replace")


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    main, side = os.openpty()
    with os.fdopen(side, "w", encoding="utf-8") as tty:
        out = StatusOutput(tty)
        assert out.every == 1.0
        out.status("[    1s] first status")
        out.status("[    2s] second status")
        out.end_status()
        out.say("stopping")
        written = _read_until(main, "fuzzfarm: stopping")
    os.close(main)
    assert "\x1b[" in written  # cursor movement: the line is redrawn, not repeated
    last = written.rsplit("second status", 1)[1]
    assert "first status" not in last and "fuzzfarm: stopping" in last
    # the last status stays on screen, on its own line above what follows
    assert re.search(r"second status\s*\r?\n.*fuzzfarm: stopping", written, re.S)


def test_a_stderr_that_went_away_stops_nothing() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write fails with EPIPE
    gone = os.fdopen(write, "w")
    out = StatusOutput(gone)
    out.say("starting")
    out.status("[    1s] status")
    out.end_status()
    out.say("stopping")
    assert out.gone
    with contextlib.suppress(BrokenPipeError):
        gone.close()  # what is left in its buffer cannot be written either
    main, side = os.openpty()
    tty = os.fdopen(side, "w")
    hung_up = StatusOutput(tty)
    hung_up.status("[    1s] status")
    os.close(main)  # the terminal went away mid-run (a dropped ssh session)
    hung_up.status("[    2s] status")
    hung_up.end_status()
    hung_up.say("stopping")
    assert hung_up.gone
    with contextlib.suppress(OSError):
        tty.close()
    closed = io.StringIO()
    closed.close()
    quiet = StatusOutput(closed)
    quiet.status("[    1s] status")
    quiet.say("stopping")
    assert quiet.gone
    StatusOutput(None).say("no stderr at all")  # started with fd 2 closed


@pytest.fixture(scope="module")
def farm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        store = FarmStore.connect(server.url)
        for i in range(3):
            store.buckets.upsert(f"{i:016x}", f"{LONG_SIGNATURE} #{i}", "vaddr-corruption",
                                 "seed", f"{i:064x}", 100 + i, {})
        store.buckets.upsert("f" * 16, "hang | a | b | c", "hang", "seed", "e" * 64, 7, {})
        store.campaigns.create("seed", 2, 30.0)
        yield server.url


def _fuzzfarm(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *args, "--redis-url", url],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "80"})


@pytest.mark.redis
def test_bucket_table_piped_keeps_one_row_per_bucket(farm_url: str) -> None:
    run = _fuzzfarm(farm_url, "buckets")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["bucket", "class", "count", "repro", "min", "verify",
                                "signature"]
    for i in range(3):
        (row,) = [line for line in lines if line.startswith(f"{i:016x}")]
        assert row.split()[:6] == [f"{i:016x}", "vaddr-corruption", "1", str(100 + i), "-",
                                   "-"]
        assert row.endswith(f"{LONG_SIGNATURE} #{i}")  # whole, though wider than 80 columns
    assert len([line for line in lines if re.match(r"^[0-9a-f]{16} ", line)]) == 4
    only = _fuzzfarm(farm_url, "buckets", "--class", "hang").stdout
    assert "f" * 16 in only and "vaddr-corruption" not in only


@pytest.mark.redis
def test_a_table_cut_off_by_a_closed_pipe_ends_quietly(farm_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", "buckets", "--redis-url",
                             farm_url], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `fuzzfarm buckets | head` with head gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err  # as for a program ended by SIGPIPE
    assert err == ""


@pytest.mark.redis
def test_status_shows_campaigns_and_classes(farm_url: str) -> None:
    run = _fuzzfarm(farm_url, "status")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    port = farm_url.rsplit(":", 1)[1].split("/")[0]
    assert f"Redis redis://:***@127.0.0.1:{port}/0 · kernels:" in out
    password = farm_url.split("@")[0].rsplit(":", 1)[1]
    as_json = _fuzzfarm(farm_url, "status", "--json")
    assert json.loads(as_json.stdout)["redis"] == f"redis://:***@127.0.0.1:{port}/0"
    for text in (run.stdout, run.stderr, as_json.stdout):
        assert password not in text
    (row,) = [line for line in out.splitlines() if " running " in line]
    assert row.split()[1:] == ["running", "seed", "0", "0", "0", "0"]
    assert re.search(r"^hang\s+1$", out, re.M) and re.search(r"^vaddr-corruption\s+3$", out,
                                                              re.M)
    assert "buckets: 4" in out


def test_status_without_redis_is_one_line(tmp_path: Path) -> None:
    run = _fuzzfarm(f"redis://:s3cret-pw@127.0.0.1:{_free_port()}/0", "status")
    assert run.returncode == 2
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "s3cret-pw" not in run.stderr


@pytest.mark.parametrize(("setting", "said"), [
    ("FUZZFARM_SLICE_SECONDS=soon", "FUZZFARM_SLICE_SECONDS must be a number, not 'soon'"),
    ("FUZZFARM_CROSSCHECK=maybe", "FUZZFARM_CROSSCHECK must be 1 or 0 (on or off)")])
@pytest.mark.parametrize("command", [["worker", "--name", "w"], ["up", "--data", "DATA"]])
def test_a_setting_that_cannot_be_read_is_one_line_before_anything_starts(
        tmp_path: Path, setting: str, said: str, command: list[str]) -> None:
    name, value = setting.split("=")
    args = [tmp_path / "farm" if a == "DATA" else a for a in command]
    run = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *map(str, args)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, name: value, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("fuzzfarm: error: ") and said in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "farm").exists()  # nothing was started


@pytest.mark.redis
def test_buckets_merge_and_split_from_the_command_line(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        store = FarmStore.connect(server.url)
        shas = [store.blobs.put(bytes([i]) * (10 + i)) for i in range(3)]
        store.buckets.upsert("a" * 16, "one", "hang", "seed", shas[0], 10, {})
        store.buckets.upsert("b" * 16, "two", "hang", "seed", shas[1], 11, {})
        store.buckets.upsert("b" * 16, "two", "hang", "seed", shas[2], 12, {})
        bad = _fuzzfarm(server.url, "buckets", "merge", "a" * 16)
        assert bad.returncode != 0 and "needs the bucket to keep" in bad.stderr
        assert "Traceback" not in bad.stderr
        unknown = _fuzzfarm(server.url, "buckets", "merge", "a" * 16, "c" * 16)
        assert unknown.returncode != 0 and f"no bucket {'c' * 16}" in unknown.stderr
        split = _fuzzfarm(server.url, "buckets", "split", "b" * 16, shas[2], "--name", "other")
        assert split.returncode == 0, split.stderr
        assert "two [other]" in split.stdout
        merge = _fuzzfarm(server.url, "buckets", "merge", "a" * 16, "b" * 16)
        assert merge.returncode == 0, merge.stderr
        assert "2 inputs" in merge.stdout
        log = _fuzzfarm(server.url, "buckets", "--log").stdout
        assert log.splitlines()[0].startswith("merge") and "split" in log
