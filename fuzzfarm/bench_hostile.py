"""`fuzzfarm bench hostile`: a storm of hostile inputs through the emulator, run exactly as a
fuzzing job runs them, counting what the harness itself gets wrong.

The farm may only ever blame the kernel: an input, however malformed, must end as a Result
(`ok`, `rejected` or `crash`), never as a harness error (`kernel_emu.errors.HarnessError`,
which the Executor also wraps any other exception of ours in) and never as an exception
escaping the Executor. Five families of inputs, drawn from a seeded generator so that a run
can be repeated input for input:

- `random`: random bytes, 0 to 4 KiB;
- `random-elf`: the ELF64 little-endian identification, then random bytes, so the loader's
  checks past the magic are reached;
- `truncated`: a seed cut short, mostly within its headers;
- `bit-flipped`: a seed with 1 to 16 bits flipped, mostly in its headers;
- `extreme-header`: a seed with header or program-header fields set to extremes: e_phnum 0,
  1 or 0xffff, e_phoff past the end, offsets and sizes whose sums overflow 64 bits, addresses
  at the profile's heap and ramdisk bounds, in the kernel half or at the top of the address
  space.

Each input runs on a snapshot executor with guest coverage and the fuzzer's watchdog, as in
`fuzz/harness.py`; a run the watchdog stopped is confirmed with the profile's whole budget
once per signature, as a job does.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.harness import WATCHDOG
from kernel_emu.elflayout import (
    ELF64_EHDR,
    ELF64_EHDR_SIZE,
    ELF64_PHDR,
    ELF64_PHDR_SIZE,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    EM_X86_64,
    ET_EXEC,
    EV_CURRENT,
    PN_XNUM,
    PT_LOAD,
)
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.executor import Executor
from kernel_emu.profile import TargetProfile, load_profile
from kernel_emu.result import Result

SEEDS = Path(__file__).resolve().parents[1] / "corpus" / "seeds"
FAMILIES = ("random", "random-elf", "truncated", "bit-flipped", "extreme-header")
U64 = (1 << 64) - 1
PAGE = 0x1000
# values that break naive arithmetic on 64-bit offsets, sizes and addresses
EXTREME_U64 = (0, 1, PAGE - 1, PAGE, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32,
               1 << 47, 0x0000_7FFF_FFFF_F000, 0xFFFF_8000_0000_0000, 1 << 63, U64 - PAGE + 1,
               U64 - 7, U64 - 1, U64)
EXTREME_U16 = (0, 1, 2, 0x7FFF, 0x8000, 0xFFFE, PN_XNUM)
EXTREME_U32 = (0, 1, 7, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF)
SHOWN_ERRORS = 5  # harness errors printed in full; the rest are only counted
PROGRESS_EVERY = 10.0


@dataclass
class FamilyCounts:
    inputs: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    stalled: int = 0  # stopped by the watchdog (then judged as a job judges them)
    harness_errors: int = 0
    exceptions: int = 0  # anything else escaping the Executor: a bug of ours too
    skipped: int = 0  # InputError: too large for the ramdisk, as a job skips them


@dataclass
class StormReport:
    kernel: str
    seed: int
    families: dict[str, FamilyCounts]
    signatures: set[str]
    confirmed: int  # stalled runs re-run with the profile's budget (once per signature)
    seconds: float
    errors: list[str]  # the first few harness errors and exceptions, with their inputs' shas

    @property
    def inputs(self) -> int:
        return sum(f.inputs for f in self.families.values())

    @property
    def harness_errors(self) -> int:
        return sum(f.harness_errors for f in self.families.values())

    @property
    def exceptions(self) -> int:
        return sum(f.exceptions for f in self.families.values())


# the inputs ----------------------------------------------------------------------------------

def _seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(SEEDS.glob("*.elf"))]
    if not seeds:
        raise HarnessError(f"no seed ELFs in {SEEDS}")
    return seeds


def _random(rng: random.Random, _seeds: list[bytes]) -> bytes:
    # mostly short: the kernel's first checks see most of them, a few are long
    return rng.randbytes(rng.choice((0, 1, 4, 16, 63, 64, 65, 120, 512, 4096)) if
                         rng.random() < 0.3 else rng.randrange(4097))


def _random_elf(rng: random.Random, _seeds: list[bytes]) -> bytes:
    ident = ELF_MAGIC + bytes((ELFCLASS64, ELFDATA2LSB, EV_CURRENT))
    data = bytearray(ident + rng.randbytes(rng.randrange(ELF64_EHDR_SIZE, 4097)))
    # most keep the header fields the loader checks first, and a plausible table of random
    # program headers, so that the random bytes reach the segment checks
    if rng.random() < 0.75:
        ELF64_EHDR["e_type"].write(data, ET_EXEC)
        ELF64_EHDR["e_machine"].write(data, EM_X86_64)
        ELF64_EHDR["e_version"].write(data, EV_CURRENT)
        if rng.random() < 0.75:
            ELF64_EHDR["e_phoff"].write(data, ELF64_EHDR_SIZE)
            ELF64_EHDR["e_phentsize"].write(data, ELF64_PHDR_SIZE)
            phnum = min(rng.randrange(1, 9), (len(data) - ELF64_EHDR_SIZE) // ELF64_PHDR_SIZE)
            ELF64_EHDR["e_phnum"].write(data, phnum)
            for i in range(phnum):
                base = ELF64_EHDR_SIZE + i * ELF64_PHDR_SIZE
                if rng.random() < 0.75:
                    ELF64_PHDR["p_type"].write(data, PT_LOAD, base)
                if rng.random() < 0.5:  # file contents inside the file, the rest random
                    offset = rng.randrange(len(data))
                    ELF64_PHDR["p_offset"].write(data, offset, base)
                    ELF64_PHDR["p_filesz"].write(data, rng.randrange(len(data) - offset), base)
                    ELF64_PHDR["p_memsz"].write(data, rng.randrange(1 << 24), base)
                    ELF64_PHDR["p_align"].write(data, rng.choice((0, 1)), base)
    return bytes(data)


def _truncated(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = rng.choice(seeds)
    phoff = ELF64_EHDR["e_phoff"].read(data)
    phnum = ELF64_EHDR["e_phnum"].read(data)
    headers_end = min(len(data), phoff + phnum * ELF64_PHDR_SIZE)
    cut = rng.choice((rng.randrange(ELF64_EHDR_SIZE + 1), rng.randrange(headers_end + 1),
                      rng.randrange(len(data))))
    return data[:cut]


def _bit_flipped(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 17)):
        at = rng.randrange(min(len(data), 0x200)) if rng.random() < 0.8 else \
            rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def profile_addresses(profile: TargetProfile) -> tuple[int, ...]:
    """Addresses of this kernel's own layout, from its profile: where a loader's checks on
    segment addresses are most likely to be off by one."""
    heap, memory = profile.heap, profile.memory
    return (heap.base, heap.base + heap.header_size, heap.end - PAGE, heap.end,
            memory.ramdisk_base, memory.ramdisk_base + memory.ramdisk_size, memory.ram_size)


def _extreme_header(rng: random.Random, seeds: list[bytes],
                    addresses: tuple[int, ...] = ()) -> bytes:
    data = bytearray(rng.choice(seeds))
    extreme_u64 = EXTREME_U64 + addresses
    size = len(data)
    phoff = ELF64_EHDR["e_phoff"].read(data)
    phnum = ELF64_EHDR["e_phnum"].read(data)
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(4)
        if what == 0:
            ELF64_EHDR["e_phnum"].write(data, rng.choice(EXTREME_U16))
        elif what == 1:
            # past the end, just inside it, or wrapping around once multiplied out
            ELF64_EHDR["e_phoff"].write(data, rng.choice(
                (size, size + 1, size - 1, size - ELF64_PHDR_SIZE + 1, *extreme_u64)))
        elif what == 2:
            name = rng.choice(("e_phentsize", "e_ehsize", "e_shnum", "e_shentsize",
                               "e_shstrndx", "e_entry", "e_shoff", "e_flags", "e_version"))
            f = ELF64_EHDR[name]
            values = {2: EXTREME_U16, 4: EXTREME_U32, 8: extreme_u64}[f.size]
            f.write(data, rng.choice(values))
        elif phnum and phoff + phnum * ELF64_PHDR_SIZE <= size:
            base = phoff + rng.randrange(phnum) * ELF64_PHDR_SIZE
            name = rng.choice(("p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
                               "p_align", "p_type", "p_flags"))
            f = ELF64_PHDR[name]
            if f.size == 4:
                f.write(data, rng.choice(EXTREME_U32), base)
            elif name in ("p_filesz", "p_memsz") and rng.random() < 0.5:
                # a size that wraps the segment's start or offset around 2^64 by a little
                start = ELF64_PHDR["p_offset" if name == "p_filesz" else "p_vaddr"].read(
                    data, base)
                f.write(data, (U64 - start + 1 + rng.randrange(2 * PAGE)) & U64, base)
            else:
                f.write(data, rng.choice(extreme_u64), base)
    return bytes(data)


MAKERS: dict[str, Callable[[random.Random, list[bytes]], bytes]] = {
    "random": _random, "random-elf": _random_elf, "truncated": _truncated,
    "bit-flipped": _bit_flipped,
}


def hostile_inputs(count: int, seed: int, addresses: tuple[int, ...] = ()
                   ) -> Iterator[tuple[str, bytes]]:
    """`count` (family, input) pairs, the families taking turns; the same for the same seed."""
    rng = random.Random(seed)
    seeds = _seeds()
    for i in range(count):
        family = FAMILIES[i % len(FAMILIES)]
        if family == "extreme-header":
            yield family, _extreme_header(rng, seeds, addresses)
        else:
            yield family, MAKERS[family](rng, seeds)


# the storm -----------------------------------------------------------------------------------

class _JobLike:
    """Runs inputs as `fuzz.harness.Job.run_input` does: the snapshot executor with coverage and
    the watchdog; a stalled run confirmed once per signature without it; a fresh executor after
    a harness error."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile
        self.executor = self._new()
        self.confirmer: Executor | None = None
        self.judged: dict[str, bool] = {}  # stalled signature -> the full budget confirmed it
        self.confirmed = 0

    def _new(self) -> Executor:
        return Executor(self.profile, coverage=True, watchdog=WATCHDOG, explain=False,
                        cycles_to_budget=True)

    def run(self, data: bytes) -> tuple[Result, bool]:
        """The Result as a job would record it, and whether the watchdog stopped the run."""
        try:
            result = self.executor.run(data)
        except InputError:
            raise
        except BaseException:
            self.executor = self._new()  # the machine may be in any state: start afresh
            raise
        stalled = bool(self.executor.stalled_at)
        if stalled and result.verdict == "crash" and result.signature and \
                result.signature not in self.judged:
            if self.confirmer is None:
                self.confirmer = Executor(self.profile, explain=False)
            try:
                confirmed = self.confirmer.run(data)
            except BaseException:
                self.confirmer = None
                raise
            self.confirmed += 1
            self.judged[result.signature] = confirmed.signature == result.signature
            if confirmed.verdict == "crash":
                result = confirmed
        return result, stalled


def run_storm(kernel: str, count: int, seed: int = 1,
              progress: Callable[[int, float], None] = lambda _n, _t: None) -> StormReport:
    profile = load_profile(kernel)
    job = _JobLike(profile)
    families = {name: FamilyCounts() for name in FAMILIES}
    signatures: set[str] = set()
    errors: list[str] = []
    started = time.perf_counter()
    next_progress = started + PROGRESS_EVERY
    for n, (family, data) in enumerate(hostile_inputs(count, seed, profile_addresses(profile)), 1):
        counts = families[family]
        counts.inputs += 1
        try:
            result, stalled = job.run(data)
        except InputError:
            counts.skipped += 1
            continue
        except HarnessError as e:
            counts.harness_errors += 1
            _keep(errors, family, data, f"harness error: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - counted: any of these is a bug of ours
            counts.exceptions += 1
            _keep(errors, family, data, f"exception: {type(e).__name__}: {e}")
            continue
        counts.verdicts[result.verdict] += 1
        counts.stalled += stalled
        if result.signature:
            signatures.add(result.signature)
        now = time.perf_counter()
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            progress(n, now - started)
    return StormReport(kernel, seed, families, signatures, job.confirmed,
                       time.perf_counter() - started, errors)


def _keep(errors: list[str], family: str, data: bytes, what: str) -> None:
    if len(errors) < SHOWN_ERRORS:
        errors.append(f"{family} input {hashlib.sha256(data).hexdigest()} "
                      f"({len(data)} bytes): {what}")


def print_report(report: StormReport) -> None:
    print(f"{'family':<16}{'inputs':>10}{'ok':>10}{'rejected':>10}{'crash':>10}"
          f"{'stalled':>9}{'harness errors':>16}{'exceptions':>12}")
    for name, c in report.families.items():
        print(f"{name:<16}{c.inputs:>10,}{c.verdicts['ok']:>10,}{c.verdicts['rejected']:>10,}"
              f"{c.verdicts['crash']:>10,}{c.stalled:>9,}{c.harness_errors:>16,}"
              f"{c.exceptions:>12,}")
    skipped = sum(c.skipped for c in report.families.values())
    rate = report.inputs / report.seconds if report.seconds > 0 else 0.0
    print(f"total: {report.inputs:,} inputs in {report.seconds:.1f} s ({rate:,.0f}/s) on "
          f"{report.kernel}, generator seed {report.seed}; {len(report.signatures)} distinct "
          f"crash signatures; {report.confirmed} stalled runs confirmed with the full budget"
          + (f"; {skipped} skipped (too large for the ramdisk)" if skipped else ""))
    print(f"harness errors: {report.harness_errors}   Python exceptions: {report.exceptions}")
    for line in report.errors:
        print(f"  {line}")


def bench_hostile(kernel: str = "seed", inputs: int = 1_000_000, seed: int = 1) -> int:
    """Exit status 0 when no input made the harness fail, 1 otherwise."""
    print(f"{inputs:,} hostile inputs ({', '.join(FAMILIES)}, in turn) on {kernel}, run as a "
          f"fuzzing job runs them (snapshot, coverage, watchdog {WATCHDOG:,})", flush=True)

    def progress(n: int, seconds: float) -> None:
        print(f"  {n:,} inputs, {seconds:.0f} s ({n / seconds:,.0f}/s)", file=sys.stderr,
              flush=True)

    report = run_storm(kernel, inputs, seed, progress)
    print_report(report)
    return 1 if report.harness_errors or report.exceptions else 0
