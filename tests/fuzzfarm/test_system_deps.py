"""What `make` says and does about system packages, run as a real non-root user (nobody) on a
PATH without the programs in question: a missing browser means skipped browser tests and one
line naming the command; a missing compiler stops setup with one line naming the command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import path_without

ROOT = Path(__file__).parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")  # the script needs the standard library only
NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder the nobody user can read (pytest's own are private to root)."""
    where = Path(tempfile.mkdtemp(prefix="fuzzfarm-sysdeps-"))
    where.chmod(0o755)
    shutil.copy(ROOT / "fuzzfarm" / "system_deps.py", where / "system_deps.py")
    (where / "system_deps.py").chmod(0o644)
    yield where
    shutil.rmtree(where)


def _as_nobody(where: Path, target: str, missing: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run as another user")
    path = path_without(where / "bin", missing)
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", str(SYSTEM_PYTHON), str(where / "system_deps.py"),
                           target], env={"PATH": path, "HOME": str(where)},
                          capture_output=True, text=True, timeout=60)


def test_without_a_browser_the_tests_go_on_and_say_how_to_run_them(open_dir: Path) -> None:
    run = _as_nobody(open_dir, "test", ["chromium", "chromium-browser", "chromedriver"])
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "will be skipped" in lines[0] and "browser tests" in lines[0]
    assert lines[0].endswith("sudo apt-get install chromium chromium-driver"), lines[0]


def test_without_a_compiler_setup_stops_with_the_command_to_run(open_dir: Path) -> None:
    run = _as_nobody(open_dir, "setup", ["gcc", "cc"])
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.splitlines()
    assert "missing a C compiler (gcc)" in line and line.endswith("sudo apt-get install gcc")


def test_with_everything_present_nothing_is_said() -> None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("this machine lacks the browser parts")
    run = subprocess.run([sys.executable, str(ROOT / "fuzzfarm" / "system_deps.py"), "test"],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_a_wrong_target_is_a_usage_line() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "fuzzfarm" / "system_deps.py"), "nope"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("usage:")
