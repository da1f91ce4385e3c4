"""`fuzzfarm bench hostile`: hostile inputs in bulk through the emulator as a fuzzing job runs
them, and not one harness error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fuzzfarm.bench_hostile import FAMILIES, SEEDS, bench_hostile, hostile_inputs
from kernel_emu.allocations import replay
from kernel_emu.elflayout import ELF64_EHDR, ELF64_PHDR_SIZE, ELF_MAGIC, PN_XNUM

ROOT = Path(__file__).parents[2]
# the CI's share of the storm (10^6 for the figures in docs/reliability.md): ~10 s
CI_INPUTS = 20_000
ROW = re.compile(r"^(?P<family>[\w-]+)\s+(?P<inputs>[\d,]+)\s+(?P<ok>[\d,]+)\s+"
                 r"(?P<rejected>[\d,]+)\s+(?P<crash>[\d,]+)\s+(?P<stalled>[\d,]+)\s+"
                 r"(?P<errors>[\d,]+)\s+(?P<exceptions>[\d,]+)$", re.M)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_a_storm_of_hostile_inputs_makes_no_harness_error() -> None:
    run = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "bench", "hostile",
                          "--inputs", str(CI_INPUTS)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {m["family"]: {k: _number(v) for k, v in m.groupdict().items() if k != "family"}
            for m in ROW.finditer(run.stdout)}
    assert list(rows) == list(FAMILIES)
    for family, row in rows.items():
        assert row["inputs"] == CI_INPUTS // len(FAMILIES), family
        # every input ended as a Result: the kernel's verdicts account for all of them
        assert row["ok"] + row["rejected"] + row["crash"] == row["inputs"], (family, row)
        assert row["errors"] == 0 and row["exceptions"] == 0, (family, row)
    assert sum(row["crash"] for row in rows.values()) > 0  # the storm reaches the bugs
    assert sum(row["ok"] for row in rows.values()) > 0  # and loads what is still loadable
    assert "harness errors: 0   Python exceptions: 0" in run.stdout
    assert re.search(r"total: 20,000 inputs in [\d.]+ s \([\d,]+/s\)", run.stdout)


def test_the_families_are_hostile_in_the_ways_they_say() -> None:
    storm = list(hostile_inputs(5_000, seed=7))
    assert storm == list(hostile_inputs(5_000, seed=7))  # a storm can be run again exactly
    by_family: dict[str, list[bytes]] = {f: [] for f in FAMILIES}
    for family, data in storm:
        by_family[family].append(data)
    assert all(len(inputs) == 1_000 for inputs in by_family.values())
    seeds = {p.read_bytes() for p in SEEDS.glob("*.elf")}
    assert not any(data.startswith(ELF_MAGIC) for data in by_family["random"][:50])
    assert all(data.startswith(ELF_MAGIC) for data in by_family["random-elf"])
    assert all(any(s.startswith(data) and s != data for s in seeds)
               for data in by_family["truncated"])
    assert all(data not in seeds and len(data) in {len(s) for s in seeds}
               for data in by_family["bit-flipped"])
    extreme = by_family["extreme-header"]
    phnums = {ELF64_EHDR["e_phnum"].read(data) for data in extreme}
    assert {0, PN_XNUM} <= phnums
    assert any(ELF64_EHDR["e_phoff"].read(data) >= len(data) for data in extreme)
    # a table whose end overflows 64 bits
    assert any(ELF64_EHDR["e_phoff"].read(data) + ELF64_PHDR_SIZE > 1 << 64 for data in extreme)


def test_a_harness_error_is_counted_and_fails_the_bench(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    calls = 0

    def broken_replay(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls % 10 == 3:  # a bug of ours that some inputs hit
            raise KeyError("observer bug")
        return replay(*args, **kwargs)

    monkeypatch.setattr("kernel_emu.executor.replay", broken_replay)
    assert bench_hostile("seed", inputs=50) == 1
    out = capsys.readouterr().out
    m = re.search(r"harness errors: (\d+)   Python exceptions: 0", out)
    assert m and int(m.group(1)) >= 4, out
    assert "internal error while booting the input: KeyError" in out
