"""The race of `fuzzfarm bench compare`: the exported snapshot resumed under a plain Unicorn
stops where the farm's executor stops, and a short race gives every competitor a row or a
reason."""

from __future__ import annotations

import importlib.util
import json
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
    # the farm finds at least one planted bug in seconds, and says when
    assert any(t is not None for t in runs["farm"]["time_to_bug"].values())
    assert "execs/s/core" in printed
