"""Local campaigns with real Atheris/libFuzzer job processes and the real emulated kernel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fuzz import harness
from fuzz.campaign import _spawn, add_run_endings, read_job_stats, run_campaign
from fuzz.harness import LIBC_TUNABLE, Job, JobConfig, job_environment
from kernel_emu.result import RUN_ENDINGS, run_ending
from tests.reproducers import REPRODUCERS

SEEDS = Path(__file__).parents[2] / "corpus" / "seeds"
EXAMPLE = Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf"


def _config(tmp_path: Path, kernel: str, **kw: object) -> JobConfig:
    return JobConfig(kernel=kernel, out=str(tmp_path / "out"), seeds=[str(SEEDS)], **kw)


def test_seed_campaign_finds_the_vaddr_corruption(tmp_path: Path) -> None:
    # a bound on executions, not on time: the job stops at the first vaddr-corruption
    summary = run_campaign(_config(tmp_path, "seed", runs=2_000, stop_on="vaddr-corruption"),
                           1, live=False)
    assert summary.job_failures == []
    assert summary.harness_errors == 0
    assert "vaddr-corruption" in summary.first_class, summary.first_class
    stats = json.loads((tmp_path / "out" / "jobs" / "job-0.json").read_text())
    assert stats["stop_reason"] == "found"
    assert stats["execs"] <= 2_000
    # every bucket keeps a reproducer with its Result, and the Result says what was found
    assert summary.buckets
    for bucket in summary.buckets:
        report = json.loads(bucket.reproducer.with_suffix(".json").read_text())
        assert report["verdict"] == "crash"
        assert report["signature"] == bucket.signature
    # what the statistics say was found (as cause or consequence) has an input kept for it
    classes = {f["class"] for b in summary.buckets
               for report in b.reproducer.parent.glob("*.json")
               for f in json.loads(report.read_text())["findings"]}
    assert "vaddr-corruption" in classes


def test_fixed_campaign_finds_nothing(tmp_path: Path) -> None:
    summary = run_campaign(_config(tmp_path, "fixed", runs=400), 1, live=False)
    assert summary.job_failures == []
    assert summary.harness_errors == 0
    assert summary.execs >= 400
    assert summary.buckets == []
    assert summary.edges > 0  # the guest's coverage reached the fuzzer


def test_fuzz_command_reports_bad_options_in_one_line(tmp_path: Path) -> None:
    for args, needle in ((["--kernel", "nope"], "nope"), (["--jobs", "0"], "--jobs"),
                         (["--seeds", str(tmp_path / "missing")], "seed directory")):
        proc = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "fuzz", "--out",
                               str(tmp_path / "o"), *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_campaign_can_run_another_checkouts_code(tmp_path: Path) -> None:
    """`bench fuzz --other`: the jobs run the code of the checkout they are given. The other
    checkout here is this one with its job harness marked: the job says which ran."""
    root = Path(__file__).parents[2]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("kernel_emu", "corpus"):
        (other / name).symlink_to(root / name)
    shutil.copytree(root / "fuzz", other / "fuzz",
                    ignore=shutil.ignore_patterns("__pycache__"))
    harness = other / "fuzz" / "harness.py"
    source = harness.read_text()
    anchor = "        self.stats.notes = list(self.executor.notes)\n"
    assert anchor in source
    harness.write_text(source.replace(
        anchor, anchor + '        self.stats.notes.append("the other checkout ran")\n'))
    config = JobConfig(kernel="seed", out=str(tmp_path / "out"), seeds=[str(SEEDS)], runs=50)
    summary = run_campaign(config, 1, live=False, checkout=other)
    assert summary.job_failures == []
    assert summary.execs >= 50
    stats = json.loads((tmp_path / "out" / "jobs" / "job-0.json").read_text())
    assert "the other checkout ran" in stats["notes"]
    # and without it, this checkout's own code
    config = JobConfig(kernel="seed", out=str(tmp_path / "mine"), seeds=[str(SEEDS)], runs=50)
    run_campaign(config, 1, live=False)
    stats = json.loads((tmp_path / "mine" / "jobs" / "job-0.json").read_text())
    assert "the other checkout ran" not in stats["notes"]


def test_job_statistics_are_written_as_every_field_holds_them() -> None:
    """The statistics a job writes every second (built by hand, for speed) say what the
    dataclass holds, every field included: compared with dataclasses' own deep copy."""
    from dataclasses import asdict

    from fuzz.harness import FindingStats, JobStats

    stats = JobStats(job=1, kernel="seed", pid=7, started=1.0, updated=3.5, execs=10,
                     seconds={"guest": 0.5}, notes=["a note"], slow_inputs=["ab" * 32],
                     findings={"sig": FindingStats("hang", "b1", 2, 3, 0.25, 100)},
                     first_class={"hang": (3, 0.25)}, canaries={"RX-01": [0.5, None]},
                     run_endings={"halts: rejected": [4, 0.01, 0.002, 0.003, 0.004]})
    expected = asdict(stats)
    expected["elapsed"] = stats.elapsed
    written = json.loads(json.dumps(stats.to_json()))
    assert written == json.loads(json.dumps(expected))
    assert JobStats.from_json(written) == stats


def test_a_job_counts_its_runs_and_their_time_by_how_they_ended(tmp_path: Path) -> None:
    """Each run the kernel saw is counted once, under how it ended (the same input booted
    again says), with its time and the executor's phases of it; an input the kernel never
    sees is not a run. The statistics file carries the table, and campaigns add them up."""
    three = EXAMPLE.read_bytes()
    inputs = [three, b"\x7fELF" + bytes(60), three] + [r.make(three) for r in REPRODUCERS[:5]]
    job = Job(JobConfig(kernel="seed", out=str(tmp_path / "out")))
    start = time.perf_counter()
    for data in inputs:
        job.run_input(data)
    took = time.perf_counter() - start
    job.run_input(bytes(64 << 20))  # larger than the ramdisk: skipped
    assert job.stats.skipped == 1
    expected: Counter[str] = Counter()
    for data in inputs:
        result = job.executor.run(data)
        expected[run_ending(result.stop, result.verdict, bool(job.executor.stalled_at))] += 1
    endings = job.stats.run_endings
    assert {name: int(row[0]) for name, row in endings.items()} == dict(expected)
    assert {"enters ring 3, clean", "halts: rejected"} <= set(endings) <= set(RUN_ENDINGS)
    assert len(expected) >= 3  # findings too, not only the clean and the rejected
    assert 0 < sum(row[1] for row in endings.values()) <= took
    for _runs, seconds, *phases in endings.values():
        assert all(p > 0 for p in phases) and sum(phases) <= seconds
    job.flush()
    written = read_job_stats(tmp_path / "out", 0)
    assert written is not None and written.run_endings == endings
    twice = add_run_endings([endings, written.run_endings])
    assert twice == {name: [2 * x for x in row] for name, row in endings.items()}


LD_SO = Path("/lib64/ld-linux-x86-64.so.2")
AVX512 = pytest.mark.skipif(not harness._libc_has_avx512_functions(),
                            reason="glibc has no AVX-512 string functions on this CPU")


def _prefers_no_avx512(env: dict[str, str]) -> bool:
    out = subprocess.run([str(LD_SO), "--list-diagnostics"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return "x86.cpu_features.preferred.Prefer_No_AVX512=0x1" in out.splitlines()


def test_a_job_environment_drops_coverage_and_keeps_the_rest() -> None:
    env = job_environment({"PATH": "/usr/bin", "PYTHONCOVERAGE": "1", "X": "y"})
    assert "PYTHONCOVERAGE" not in env
    assert env["PATH"] == "/usr/bin" and env["X"] == "y"


@AVX512
def test_jobs_prefer_glibcs_256_bit_string_functions_unless_the_user_chose() -> None:
    assert job_environment({})["GLIBC_TUNABLES"] == LIBC_TUNABLE
    theirs = job_environment({"GLIBC_TUNABLES": "glibc.malloc.check=3"})
    assert theirs["GLIBC_TUNABLES"] == "glibc.malloc.check=3:" + LIBC_TUNABLE
    chosen = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}
    assert job_environment(chosen) == chosen
    # and glibc takes it
    if LD_SO.exists():
        plain = {k: v for k, v in job_environment().items() if k != "GLIBC_TUNABLES"}
        assert _prefers_no_avx512(job_environment(plain))


@AVX512
def test_a_campaigns_job_process_starts_with_the_job_environment(tmp_path: Path) -> None:
    (tmp_path / "out" / "jobs").mkdir(parents=True)
    config = _config(tmp_path, "seed", seconds=30)
    process, log = _spawn(config, tmp_path / "out")
    try:
        # the parent may see the exec through before the kernel has set the new image's
        # environment up: until then the file reads empty
        deadline = time.monotonic() + 10
        while not (environ := Path(f"/proc/{process.pid}/environ").read_bytes()):
            assert time.monotonic() < deadline, "the job process showed no environment"
            time.sleep(0.01)
        environ = b"\0" + environ
    finally:
        process.kill()
        process.wait()
        log.close()
    expected = job_environment()["GLIBC_TUNABLES"]
    # glibc may cut its own copy of the variable at each ':' as it reads it
    assert any(f"\0GLIBC_TUNABLES={expected}".replace(":", cut).encode() in environ
               for cut in (":", "\0"))
