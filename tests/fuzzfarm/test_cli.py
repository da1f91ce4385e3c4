"""The `fuzzfarm` command as a user runs it: a real subprocess, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.elfs import build_elf
from tests.reproducers import split_trigger

JSON_KEYS = {"verdict", "crash_class", "signature", "findings", "pc", "symbol", "backtrace",
             "segments", "expected_segments", "log", "instructions"}


def fuzzfarm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_elf(tmp_path_factory.mktemp("cli"), loads=3)


def test_boot_ok_json(elf: Path) -> None:
    proc = fuzzfarm("boot", "--kernel", "fixed", "--json", str(elf))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= JSON_KEYS
    assert out["verdict"] == "ok" and out["crash_class"] is None
    assert all(isinstance(s["vaddr"], int) for s in out["segments"])
    assert out["segments"] == out["expected_segments"]


def test_boot_seed_trigger_human(elf: Path, tmp_path: Path) -> None:
    trigger = tmp_path / "trigger.elf"
    trigger.write_bytes(split_trigger(elf.read_bytes()))
    proc = fuzzfarm("boot", "--kernel", "seed", str(trigger))
    assert proc.returncode == 1
    assert "verdict: crash" in proc.stdout
    assert "class: heap-corruption" in proc.stdout
    assert "segment 0: ELF says vaddr 0x400000, kernel loaded vaddr 0x300028" in proc.stdout
    assert "backtrace:" in proc.stdout and "LinkedListAllocator::allocate" in proc.stdout


def test_boot_full_boot_flag(elf: Path) -> None:
    proc = fuzzfarm("boot", "--full-boot", "--json", str(elf))
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    assert out["snapshot"] is False and out["verdict"] == "ok"


def test_non_elf_is_the_kernels_to_reject(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not an ELF")
    proc = fuzzfarm("boot", "--json", str(junk))
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["verdict"] == "rejected"


@pytest.mark.parametrize("args, message", [
    (("boot", "/nonexistent/x.elf"), "no such file"),
    (("boot", "--kernel", "nosuch", "x"), "unknown kernel"),
    (("boot", "--kernel", "/nonexistent/p.toml", "x"), "cannot read profile"),
])
def test_user_mistakes_are_one_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    proc = fuzzfarm(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_oversized_input_is_a_usage_error(tmp_path: Path) -> None:
    big = tmp_path / "big.elf"
    big.write_bytes(b"\0" * (17 * 1024 * 1024))
    proc = fuzzfarm("boot", str(big))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_help_on_every_command() -> None:
    for cmd in ("boot", "demo", "build-guest", "bench"):
        proc = fuzzfarm(cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout


def test_bench_boot_runs_and_reports_ratios() -> None:
    proc = fuzzfarm("bench", "boot", "--runs", "20", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    for text in ("snapshot:  median", "full boot: median", "ratio snapshot/full:",
                 "snapshot run by phase", "instructions: full boot"):
        assert text in proc.stdout


def test_bench_tracer_reports_costs_and_ratios() -> None:
    proc = fuzzfarm("bench", "tracer", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    for text in ("alu loop:", "store loop:", "native tracer + native ports",
                 "32 watches far from the loop", "native tracer + native watches"):
        assert text in proc.stdout


def test_demo_shows_the_seed_bug() -> None:
    proc = fuzzfarm("demo")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines()
               if line.startswith("vaddr-0x300028.elf") and " seed " in line)
    assert "crash" in row and "kernel loaded vaddr 0x300028" in row
    fixed = next(line for line in proc.stdout.splitlines()
                 if line.startswith("vaddr-0x300028.elf") and " fixed " in line)
    assert " ok " in fixed or "rejected" in fixed


@pytest.mark.parametrize(("args", "status"), [
    (("--help",), 0), (("boot", "--help"), 0),  # argparse drops what it cannot print
    (("boot", "--json", "fuzzfarm/examples/vaddr-0x300028.elf"), 141)])
def test_a_closed_pipe_ends_quietly(args: tuple[str, ...], status: int) -> None:
    """`fuzzfarm … | head` when head has gone: no BrokenPipe traceback; a command cut off
    ends with the status a shell gives a program ended by SIGPIPE."""
    root = Path(__file__).parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == status, err
    assert err == "", err
