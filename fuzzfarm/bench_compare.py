"""`fuzzfarm bench compare --other DIR`: this checkout's emulator against another's (an older
commit, say, checked out with `git worktree add`), measured side by side in one run; or, with
`--other-kernel K`, one kernel build against another in this checkout (the ELF image against
the UEFI one: `--kernel seed-elf --other-kernel seed`).

Each round runs one measurement process in this checkout and one in the other, alternately,
so that whatever else loads the machine hits both alike; each process imports its own tree's
code (and native hooks, which the other checkout must have built). Four figures, on the same
inputs for both: snapshot runs per second of an example, full boots per second, full boots
per second of a hang that spends the profile's whole budget (the example with e_phentsize 0,
as triage confirms a stalled input), and the execs per second of a fuzzing job's own work
(guest coverage on, the watchdog armed) over a fixed set of mutated seeds, without libFuzzer.
Medians, each round, and the ratios.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = (("snapshot", "snapshot runs/s"), ("full", "full boots/s"),
           ("hang", "hang boots/s"), ("replay", "fuzz-job execs/s"))
E_PHENTSIZE = 0x36  # Elf64_Ehdr

# run in each checkout with that checkout first on sys.path; uses only the Executor's oldest
# public surface (a profile name, run(), coverage and watchdog options)
_MEASURE = r"""
import json, sys, time
from pathlib import Path
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

kernel, inputs_dir, runs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
example = (inputs_dir / "example.elf").read_bytes()
inputs = [p.read_bytes() for p in sorted(inputs_dir.glob("input-*.elf"))]
profile = load_profile(kernel)

def rate(executor, data, n):
    executor.run(data)
    t = time.perf_counter()
    for _ in range(n):
        executor.run(data)
    return n / (time.perf_counter() - t)

out = {"snapshot": rate(Executor(profile), example, runs),
       "full": rate(Executor(profile, snapshot=False), example, max(1, runs // 40)),
       "hang": rate(Executor(profile, snapshot=False), (inputs_dir / "hang.elf").read_bytes(),
                    1)}
# as a fuzzing job runs inputs (where the tree has the options: no second run for damaged
# headers, nor for inputs with a broken header field; a proven cycle run to the budget)
import inspect
known = inspect.signature(Executor).parameters
as_job = {k: False for k in ("explain", "causes") if k in known}
as_job.update({k: True for k in ("cycles_to_budget",) if k in known})
job = Executor(profile, coverage=True, watchdog=200_000, **as_job)
for data in inputs[:20]:
    job.run(data)
t = time.perf_counter()
for data in inputs:
    job.run(data)
out["replay"] = len(inputs) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def _inputs(where: Path, count: int) -> None:
    """The example, and `count` seeds with a few bytes changed (mostly in the headers)."""
    example = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    (where / "example.elf").write_bytes(example)
    # program headers 0 bytes apart: the kernel reads the same one for ever
    hang = bytearray(example)
    hang[E_PHENTSIZE:E_PHENTSIZE + 2] = b"\0\0"
    (where / "hang.elf").write_bytes(bytes(hang))
    seeds = [p.read_bytes() for p in sorted((ROOT / "corpus" / "seeds").glob("*.elf"))]
    rng = random.Random(2026)
    for i in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 9)):
            at = (rng.randrange(min(len(data), 0x200)) if rng.random() < 0.8
                  else rng.randrange(len(data)))
            data[at] = rng.randrange(256)
        (where / f"input-{i:04d}.elf").write_bytes(bytes(data))


def _measure(tree: Path, kernel: str, inputs: Path, runs: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, kernel, str(inputs), str(runs)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the measurement failed in {tree}: {last}")
    return {k: float(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def bench_compare(other: str | None, kernel: str = "seed", rounds: int = 5, runs: int = 400,
                  inputs: int = 1000, other_kernel: str | None = None) -> int:
    theirs = Path(other).resolve() if other else ROOT
    if not (theirs / "kernel_emu" / "executor.py").is_file():
        print(f"fuzzfarm: error: {other} is not a checkout of this project", file=sys.stderr)
        return 2
    kernels = {"this": kernel, "other": other_kernel or kernel}
    results: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="fuzzfarm-compare-") as tmp:
        _inputs(Path(tmp), inputs)
        what = (f"this checkout ({ROOT}) against {theirs}" if other else
                f"kernel {kernels['this']} (this) against {kernels['other']} (other)")
        print(f"{what}: {rounds} alternating rounds, kernel {kernels['this']}"
              + (f" / {kernels['other']}" if other_kernel else "")
              + f", {runs} snapshot runs and {inputs} fuzz-job inputs each", flush=True)
        for r in range(rounds):
            order = [("this", ROOT), ("other", theirs)]
            if r % 2:
                order.reverse()  # neither side always goes first
            for side, tree in order:
                try:
                    got = _measure(tree, kernels[side], Path(tmp), runs)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                    print(f"fuzzfarm: error: {e}", file=sys.stderr)
                    return 2
                results[side].append(got)
            shown = "   ".join(f"{label}: this {results['this'][-1][key]:,.1f}, other "
                               f"{results['other'][-1][key]:,.1f}" for key, label in FIGURES)
            print(f"  round {r + 1}: {shown}", flush=True)
    print("\nmedians (this / other):")
    for key, label in FIGURES:
        mine = statistics.median(x[key] for x in results["this"])
        old = statistics.median(x[key] for x in results["other"])
        print(f"  {label:<18} this {mine:10,.1f}   other {old:10,.1f}   ratio "
              f"{mine / old:.3f}x")
    speedups = [statistics.median(x["snapshot"] / x["full"] for x in results[side])
                for side in ("this", "other")]
    print(f"  snapshot/full      this {speedups[0]:9.1f}x   other {speedups[1]:9.1f}x")
    return 0
