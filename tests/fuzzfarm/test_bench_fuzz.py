"""`fuzzfarm bench fuzz`: its breakdown of a replay by how each run ends, and its campaigns."""

from __future__ import annotations

from pathlib import Path

from fuzzfarm.bench_fuzz import _by_ending, _campaign, _mutated_inputs
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


def test_a_campaign_of_the_bench_fuzzes_with_the_seed_it_is_given(tmp_path: Path) -> None:
    """Each repeat of `bench fuzz` part 1 has a seed of its own: the bench's campaigns, of
    this checkout and of another, hand it to libFuzzer (which prints it in the job's log; a
    campaign's first job fuzzes with its seed + 1)."""
    root = Path(__file__).parents[2]
    for seed, checkout in ((3, None), (4, root)):
        out = tmp_path / f"c{seed}"
        summary = _campaign("seed", 1, out, checkout=checkout, runs=40, seed=seed)
        assert summary.job_failures == [] and summary.execs >= 40
        log = (out / "jobs" / "job-0.log").read_text()
        assert f"INFO: Seed: {seed + 1}\n" in log, log[:400]
