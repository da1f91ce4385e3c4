"""The status line of `fuzzfarm fuzz` and `fuzzfarm minimize`: live on a terminal (a real
pseudo-terminal here), plain lines on a pipe, and harmless when stderr is closed or its reader
has gone."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from fuzz.campaign import run_campaign
from fuzz.harness import JobConfig
from fuzz.progress import LIVE_EVERY, ProgressLine
from tests.reproducers import REPRODUCERS

ROOT = Path(__file__).parents[2]
THREE = ROOT / "fuzzfarm" / "examples" / "three-segments.elf"
SEEDS = ROOT / "corpus" / "seeds"
ESC = "\x1b"


class Clock:
    """A clock the test moves by hand, so that 'every N seconds' takes no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _read_all(fd: int, timeout: float, idle: float | None = None) -> str:
    """What is written to the terminal side of a pty: until every writer closed it, or (with
    `idle`) until nothing came for that long; at most `timeout` seconds."""
    chunks = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, idle or left))
        if not ready:
            if idle is not None:
                break
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the last writer closed the terminal side
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_plain_lines_on_a_pipe_every_few_seconds() -> None:
    out = io.StringIO()
    clock = Clock()
    status = ProgressLine(out, every=10.0, clock=clock)
    assert not status.live
    long = "[ 12s/60s] execs 1,234 · " + "x" * 200  # brackets are text, not markup
    status.update(long)
    clock.now += 3
    assert not status.due()
    status.update("not shown: too soon")
    clock.now += 7
    assert status.due()
    status.update("second")
    status.close()
    status.update("after close")
    assert out.getvalue() == long + "\nsecond\n"
    assert ESC not in out.getvalue()


def test_live_line_on_a_terminal_is_redrawn_and_left_in_place() -> None:
    controller, terminal = pty.openpty()
    clock = Clock()
    try:
        with os.fdopen(terminal, "w", closefd=False) as stream:
            status = ProgressLine(stream, clock=clock)
            assert status.live
            status.update("first 1")
            clock.now += LIVE_EVERY / 2
            status.update("skipped 2")  # too soon for a redraw
            status.update("pending 3")
            clock.now += LIVE_EVERY
            status.update("second 4")
            clock.now += LIVE_EVERY / 2
            status.update("last 5")  # too soon, but close shows it
            status.close()
        text = _read_all(controller, 10, idle=0.5)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "first 1" in text and "second 4" in text and "last 5" in text
    assert "skipped 2" not in text and "pending 3" not in text
    # redrawn in place (cursor moves, line erased), the cursor hidden while live and shown
    # again at the end, and the last text stays on screen with the cursor past it
    assert f"{ESC}[?25l" in text and text.rstrip().endswith(f"{ESC}[?25h")
    assert f"{ESC}[2K" in text
    assert text.index("last 5") > text.index("second 4") > text.index("first 1")


def test_no_stream_a_closed_one_or_a_gone_reader_end_only_the_line() -> None:
    ProgressLine(None).update("nowhere to go")

    closed = io.StringIO()
    closed.close()
    status = ProgressLine(closed)
    status.update("closed")
    status.close()
    assert not status.active

    reader, writer = os.pipe()
    os.close(reader)
    stream = os.fdopen(writer, "w")
    try:
        status = ProgressLine(stream)
        status.update("the reader is gone")  # EPIPE: Python ignores SIGPIPE
        assert not status.active
        status.update("nothing more is tried")
        status.close()
    finally:
        with contextlib.suppress(BrokenPipeError):  # what could not be written is still buffered
            stream.close()


def _minimize_command(tmp_path: Path) -> list[str]:
    crash = tmp_path / "crash.elf"
    crash.write_bytes(next(r for r in REPRODUCERS if r.bug == "RX-07").make(THREE.read_bytes()))
    return [sys.executable, "-m", "fuzzfarm.cli", "minimize", str(crash), "-o",
            str(tmp_path / "small.elf"), "--max-executions", "400"]


def test_minimize_prints_plain_progress_to_a_pipe(tmp_path: Path) -> None:
    proc = subprocess.run(_minimize_command(tmp_path), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("minimize: ") for line in lines), proc.stderr
    assert ESC not in proc.stderr and "\r" not in proc.stderr
    assert "bytes, signature: kernel-panic" in proc.stdout


def test_minimize_draws_a_live_line_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(_minimize_command(tmp_path), cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=terminal, text=True)
        os.close(terminal)
        text = _read_all(controller, 300)
        out, _ = proc.communicate(timeout=300)
    finally:
        os.close(controller)
    assert proc.returncode == 0, text
    assert "minimize: " in text and f"{ESC}[?25l" in text, text
    assert "bytes, signature: kernel-panic" in out


def test_minimize_works_with_stderr_closed(tmp_path: Path) -> None:
    command = " ".join(_minimize_command(tmp_path)) + " 2>&-"
    proc = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "small.elf").is_file()
    assert "bytes, signature: kernel-panic" in proc.stdout


def test_campaign_prints_plain_progress_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    config = JobConfig(kernel="fixed", out=str(tmp_path / "out"), seeds=[str(SEEDS)], runs=200)
    summary = run_campaign(config, 1, stream=stream)
    assert summary.job_failures == [] and summary.execs >= 200
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("[") and " execs " in line for line in lines), lines
    assert ESC not in stream.getvalue()


def test_fuzz_works_with_stderr_closed(tmp_path: Path) -> None:
    command = (f"{sys.executable} -m fuzzfarm.cli fuzz --kernel fixed --runs 100 "
               f"--out {tmp_path / 'out'} 2>&-")
    proc = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "no findings" in proc.stdout
