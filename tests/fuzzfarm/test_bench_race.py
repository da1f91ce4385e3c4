"""The race of `fuzzfarm bench compare`: the exported snapshot resumed under a plain Unicorn
stops where the farm's executor stops, and a short race gives every competitor a row or a
reason."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fuzzfarm.cli import main
from fuzzfarm.race_export import encode_with, export_snapshot
from kernel_emu.executor import Executor
from kernel_emu.inputs import encode
from kernel_emu.profile import load_profile
from kernel_emu.result import StopReason
from tests.reproducers import REPRODUCERS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "fuzzfarm" / "examples").glob("*.elf"))


def _resume() -> ModuleType:
    """fuzzfarm/race/resume.py as a competitor loads it: a file beside its script."""
    spec = importlib.util.spec_from_file_location("resume", ROOT / "fuzzfarm/race/resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["resume"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Executor, Path]:
    executor = Executor(load_profile("seed"))
    where = tmp_path_factory.mktemp("export")
    export_snapshot(executor, where)
    return executor, where


def _expected(executor: Executor, data: bytes) -> str:
    """What a competitor can tell of the farm's run of `data`."""
    result = executor.run(data)
    stop = result.stop
    if stop == StopReason.UNTIL:
        return "user"
    if stop in (StopReason.FAULT, StopReason.UC_ERROR):
        return "fault"
    if stop == StopReason.BUDGET:
        return "hang"
    assert stop == StopReason.HALT, stop
    return "halt" if result.reject_reason is not None and "[PANIC]" not in result.log \
        else "panic"


def _inputs() -> list[tuple[str, bytes]]:
    base = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    out = [(p.name, p.read_bytes()) for p in EXAMPLES]
    out += [(r.bug, r.make(base)) for r in REPRODUCERS]
    out += [("not an ELF", b"garbage"), ("cut short", base[:100])]
    return out


def test_the_export_writes_inputs_as_the_farm_places_them(
        exported: tuple[Executor, Path]) -> None:
    executor, where = exported
    layout = json.loads((where / "machine.json").read_text())["input"]
    for size in (0, 1, 4096, 100_000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        executor.restore(None)
        executor.channel.place(encode(executor.profile, data))
        for address, written in encode_with(layout, data):
            assert executor.machine.read(address, len(written)) == written


def test_a_resumed_snapshot_stops_where_the_farm_stops(exported: tuple[Executor, Path]) -> None:
    """Loads and enters user mode, rejected, panics, faults, hangs: the same for the farm and
    for a plain Unicorn resuming the export, at the same instruction."""
    executor, where = exported
    resume = _resume()
    export = resume.Export(where)
    kinds = set()
    for name, data in _inputs():
        uc = export.machine()
        outcome = export.run(uc, data)
        expected = _expected(executor, data)
        assert outcome.kind == expected, name
        if expected != "panic":  # the farm runs the panic handler on to its `hlt`
            assert outcome.pc == executor.machine.reg("rip"), name
        kinds.add(outcome.kind)
    assert kinds == {"user", "halt", "panic", "fault", "hang"}


class _Shm:
    """A System V shared-memory segment, as afl-fuzz makes its coverage map."""

    def __init__(self, size: int) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.shmat.restype = ctypes.c_void_p
        self.libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
        self.id = self.libc.shmget(0, size, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
        assert self.id >= 0
        self.map = (ctypes.c_ubyte * size).from_address(self.libc.shmat(self.id, None, 0))

    def clear(self) -> None:
        ctypes.memset(self.map, 0, len(self.map))

    def edges(self) -> int:
        return sum(1 for b in bytes(self.map) if b)

    def close(self) -> None:
        self.libc.shmctl(self.id, 0, None)  # IPC_RMID


def test_the_afl_harness_speaks_afl_fork_server_and_fills_its_map(
        exported: tuple[Executor, Path], tmp_path: Path) -> None:
    """What afl-fuzz sees of fuzzfarm/race/afl_harness.py: its hello, then per input a child's
    pid and wait status (SIGABRT for a panic or a fault, 0 for an input loaded or rejected),
    and edges in the shared map for every run."""
    executor, where = exported
    by_kind: dict[str, bytes] = {}
    for _name, data in _inputs():
        by_kind.setdefault(_expected(executor, data), data)
    shm = _Shm(1 << 16)
    control_r, control_w = os.pipe()
    status_r, status_w = os.pipe()
    os.dup2(control_r, 198)
    os.dup2(status_w, 199)
    current = tmp_path / "input"
    current.write_bytes(b"")
    try:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "fuzzfarm/race/afl_harness.py"), str(where), str(current)],
            cwd=ROOT / "fuzzfarm/race", pass_fds=(198, 199), env={**os.environ, "__AFL_SHM_ID":
                                                                  str(shm.id)})
    finally:
        for fd in (198, 199, control_r, status_w):
            os.close(fd)

    def word() -> int:
        assert select.select([status_r], [], [], 120)[0], "the harness said nothing"
        raw = os.read(status_r, 4)
        assert len(raw) == 4
        return int(struct.unpack("<i", raw)[0])

    try:
        assert word() == 0  # hello
        for kind in ("user", "halt", "panic", "fault"):
            current.write_bytes(by_kind[kind])
            shm.clear()
            os.write(control_w, bytes(4))
            assert word() > 0  # the child's pid
            status = word()
            if kind in ("panic", "fault"):
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT, kind
            else:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, kind
            assert shm.edges() > 10, kind
    finally:
        os.close(control_w)  # afl-fuzz gone: the fork server ends
        assert proc.wait(60) == 0
        os.close(status_r)
        shm.close()


def test_bench_compare_race_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "compare", "--competitors", "farm,nope"]) == 2
    assert "--competitors" in capsys.readouterr().err
    assert main(["bench", "compare", "--seconds", "0"]) == 2
    assert main(["bench", "compare", "--trials", "0"]) == 2


@pytest.mark.slow
def test_a_short_race_gives_every_competitor_a_row_or_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real competitors, their own virtualenvs (cached), a few seconds each."""
    status = main(["bench", "compare", "--seconds", "8", "--out", str(tmp_path)])
    assert status == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "race.json").read_text())
    runs = {r["competitor"]: r for r in data["runs"]}
    assert set(runs) == {"farm", "afl", "unicorn", "qiling"}
    for name, run in runs.items():
        if run["ran"]:
            assert run["execs"] > 0, name
            assert set(run["time_to_bug"]) == set(data["bugs"])
        else:
            assert run["reason"], name
            assert f"{name}: could not run: " in printed
    assert runs["farm"]["ran"] and runs["unicorn"]["ran"]
    if shutil.which("afl-fuzz"):
        assert runs["afl"]["ran"], runs["afl"]["reason"]
    # the farm finds at least one planted bug in seconds, and says when
    assert any(t is not None for t in runs["farm"]["time_to_bug"].values())
    assert "execs/s/core" in printed
