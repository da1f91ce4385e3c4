"""`fuzzfarm bench …`: throughput measured side by side in one run; medians and ratios."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from kernel_emu.elflayout import ELF64_EHDR
from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.profile import TargetProfile, load_profile
from kernel_emu.result import Result

BENCH_ELF = Path(__file__).parent / "examples" / "three-segments.elf"
# fills the 16 MiB heap: a segment buffer zeroed and copied by memset/memcpy
BULK_ELF = Path(__file__).parent / "examples" / "vaddr-0x300028.elf"


def _rate(executor: Executor, data: bytes, runs: int) -> tuple[float, Result]:
    start = time.perf_counter()
    result = executor.run(data)
    for _ in range(runs - 1):
        executor.run(data)
    return runs / (time.perf_counter() - start), result


def bench_boot(kernel: str, runs: int, repeats: int, native: bool = True) -> int:
    """Boots per second of a gcc-built 3-segment ELF: full boot versus snapshot restore."""
    if not BENCH_ELF.is_file():
        raise HarnessError(f"benchmark input {BENCH_ELF} is missing")
    data = BENCH_ELF.read_bytes()
    profile = load_profile(kernel)
    snap = Executor(profile, snapshot=True, native=native)
    if not snap.use_snapshot:
        raise HarnessError("; ".join(snap.notes) or "the snapshot is unavailable")
    full = Executor(profile, snapshot=False, native=native)
    full_runs = max(10, runs // 10)
    snap_rates, full_rates = [], []
    print(f"kernel {kernel}, input {BENCH_ELF.name} ({len(data)} bytes), "
          f"{'native' if native else 'pure-Python'} hooks; {repeats} repeats of "
          f"{runs} snapshot runs and {full_runs} full boots, interleaved")
    snap_result = full_result = None
    phases: dict[str, list[float]] = {"prepare": [], "guest": [], "oracles": []}
    for i in range(repeats):
        snap.phase_seconds.clear()
        s, snap_result = _rate(snap, data, runs)
        for name, seconds in snap.phase_seconds.items():
            phases[name].append(seconds / runs)
        f, full_result = _rate(full, data, full_runs)
        snap_rates.append(s)
        full_rates.append(f)
        print(f"  repeat {i + 1}: snapshot {s:8.1f} runs/s   full boot {f:7.1f} runs/s")
    assert snap_result is not None and full_result is not None
    if snap_result.comparable() != full_result.comparable():
        raise HarnessError("snapshot and full boot disagree on the benchmark input")
    s_med, f_med = statistics.median(snap_rates), statistics.median(full_rates)
    total = full_result.instructions
    after = total - snap.snapshot_instructions
    print(f"snapshot:  median {s_med:8.1f} runs/s  ({1e6 / s_med:7.1f} µs/run)")
    print(f"full boot: median {f_med:8.1f} runs/s  ({1e6 / f_med:7.1f} µs/run)")
    print(f"ratio snapshot/full: {s_med / f_med:.1f}x")
    print("snapshot run by phase (medians): " + ", ".join(
        f"{name} {1e6 * statistics.median(v):.0f} µs" for name, v in phases.items()))
    print(f"instructions: full boot {total}, after the snapshot {after} "
          f"({100 * after / total:.1f}%)")
    print(f"verdict on both: {snap_result.verdict}")
    _bench_bulk(profile, runs, repeats, native)
    return 0


def _bench_bulk(profile: TargetProfile, runs: int, repeats: int, native: bool) -> None:
    """Snapshot runs with each speed-up on versus off, interleaved: the guest's memset/memcpy
    bulk moves performed natively, and an endless loop's exact cycles skipped under the
    fuzzer's watchdog (the input: the benchmark ELF with e_phentsize 0, on which the seed's
    program-header walk never moves on)."""
    from fuzz.harness import WATCHDOG

    hang = bytearray(BENCH_ELF.read_bytes())
    ELF64_EHDR["e_phentsize"].write(hang, 0)
    cases = [
        (BENCH_ELF.name, BENCH_ELF.read_bytes(), runs, "fast_routines", {}),
        (BULK_ELF.name, BULK_ELF.read_bytes(), max(5, runs // 40), "fast_routines", {}),
        ("e_phentsize 0 (watchdog)", bytes(hang), max(10, runs // 10), "skip_cycles",
         {"watchdog": WATCHDOG}),
    ]
    print(f"\nspeed-ups on (default) versus off, snapshot runs, {repeats} interleaved repeats:")
    for name, data, n, switch, kw in cases:
        on_ex = Executor(profile, native=native, **kw)
        off_ex = Executor(profile, native=native, **kw, **{switch: False})
        rates: dict[bool, list[float]] = {True: [], False: []}
        results = {}
        for _ in range(repeats):
            for on, executor in ((True, on_ex), (False, off_ex)):
                rate, results[on] = _rate(executor, data, n)
                rates[on].append(rate)
        if results[True].comparable() != results[False].comparable():
            raise HarnessError(f"{switch} changes the result of {name}")
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"  {switch}, {name} ({results[True].instructions:,} instructions, {n} runs): "
              f"on {on:7.1f} runs/s ({1e3 / on:6.2f} ms), off {off:7.1f} runs/s "
              f"({1e3 / off:6.2f} ms), on/off {on / off:.2f}x")
