"""`fuzzfarm bench fuzz`'s breakdown of a replay by how each run ends."""

from __future__ import annotations

from pathlib import Path

from fuzzfarm.bench_fuzz import _by_ending, _mutated_inputs
from kernel_emu.result import RUN_ENDINGS
from tests.reproducers import REPRODUCERS

THREE = (Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()


def test_every_run_is_in_one_class_with_its_time_split_by_phase() -> None:
    inputs = _mutated_inputs(30) + [b"\x7fELF" + bytes(60)] + [
        r.make(THREE) for r in REPRODUCERS[:6]]
    table = _by_ending("seed", inputs)
    assert sum(row[0] for row in table.values()) == len(inputs)
    assert set(table) <= set(RUN_ENDINGS)
    assert "halts: rejected" in table
    for runs, seconds, *phases in table.values():
        assert runs > 0 and seconds > 0
        assert all(p >= 0 for p in phases) and sum(phases) <= seconds
