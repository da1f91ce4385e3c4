"""`fuzzfarm bench compare`: two checkouts' emulators measured side by side."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _fuzzfarm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_compare_with_itself_reports_every_figure_and_ratios_near_one() -> None:
    run = _fuzzfarm("bench", "compare", "--other", str(ROOT), "--repeats", "2", "--runs", "40",
                    "--inputs", "60")
    assert run.returncode == 0, run.stderr
    assert len(re.findall(r"round \d+:", run.stdout)) == 2
    ratios = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"(snapshot runs/s|full boots/s|hang boots/s|fuzz-job execs/s)\s+this\s+[\d,.]+\s+"
        r"other\s+[\d,.]+\s+ratio ([\d.]+)x", run.stdout)}
    assert set(ratios) == {"snapshot runs/s", "full boots/s", "hang boots/s",
                           "fuzz-job execs/s"}
    # the same code on a shared machine: the same speed within generous noise
    assert all(0.33 < r < 3 for r in ratios.values()), ratios


def test_compare_needs_another_checkout(tmp_path: Path) -> None:
    # (without --other, bench compare is the race of fuzzers: tests/fuzzfarm/test_bench_race.py)
    run = _fuzzfarm("bench", "compare", "--other", str(tmp_path))
    assert run.returncode == 2 and "not a checkout of this project" in run.stderr
    assert "Traceback" not in run.stderr


def test_compare_the_elf_build_with_the_uefi_build() -> None:
    run = _fuzzfarm("bench", "compare", "--kernel", "seed-elf", "--other-kernel", "seed",
                    "--repeats", "2", "--runs", "40", "--inputs", "60")
    assert run.returncode == 0, run.stderr
    assert "kernel seed-elf (this) against seed (other)" in run.stdout
    speedups = re.search(r"snapshot/full\s+this\s+([\d.]+)x\s+other\s+([\d.]+)x", run.stdout)
    assert speedups, run.stdout
    # snapshots pay off on both images (the figures of record come from longer runs)
    assert float(speedups.group(1)) > 3 and float(speedups.group(2)) > 3
