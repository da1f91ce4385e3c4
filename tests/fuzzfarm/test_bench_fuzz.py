"""`fuzzfarm bench fuzz`'s breakdown of a replay by how each run ends."""

from __future__ import annotations

from pathlib import Path

from fuzzfarm.bench_fuzz import _by_class, _mutated_inputs
from tests.reproducers import REPRODUCERS

THREE = (Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()

CLASSES = {"enters ring 3, clean", "enters ring 3, a finding", "halts: rejected",
           "halts: a finding", "stopped by the watchdog", "budget spent", "fault",
           "uc_error", "efi_return"}


def test_every_run_is_in_one_class_with_its_time_split_by_phase() -> None:
    inputs = _mutated_inputs(30) + [b"\x7fELF" + bytes(60)] + [
        r.make(THREE) for r in REPRODUCERS[:6]]
    rows = _by_class("seed", inputs)
    assert sum(runs for _, runs, _, _ in rows) == len(inputs)
    assert {name for name, _, _, _ in rows} <= CLASSES
    assert "halts: rejected" in {name for name, _, _, _ in rows}
    for _, runs, seconds, phases in rows:
        assert runs > 0 and seconds > 0
        assert all(p >= 0 for p in phases) and sum(phases) <= seconds
