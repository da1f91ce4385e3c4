"""`fuzzfarm`: the command line of the Rustux fuzz farm."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fuzzfarm.farm_cli import FarmUsageError
from kernel_emu.errors import HarnessError
from workers.settings import SettingsError

EXIT_OK, EXIT_CRASH, EXIT_ERROR = 0, 1, 2
EXIT_SIGPIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE
EXAMPLES = Path(__file__).parent / "examples"


class UsageError(Exception):
    """A mistake in how the command was called (bad path, bad option value)."""


def _read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an input file") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


FAST_ROUTINES_HELP = ("run the guest's memset/memcpy bulk moves instruction by instruction "
                      "instead of natively (same results, slower)")
BLOCK_COUNTING_HELP = ("count guest instructions with a hook on every instruction instead of "
                       "per translated block (same results, slower)")


# boot -------------------------------------------------------------------------------------

def cmd_boot(args: argparse.Namespace) -> int:
    from fuzzfarm.report import render_result
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    if args.no_input:
        return _boot_application(args)
    if args.check:
        return _check_profile(args)
    if args.elf is None:
        raise UsageError("boot needs an ELF input (or --no-input to run a UEFI application "
                         "by itself)")
    profile = load_profile(args.kernel)
    data = _read_input(args.elf)
    # one input, read by a person: a damaged heap header is charged to its last writer
    executor = Executor(profile, snapshot=not args.full_boot, native=not args.no_native,
                        fast_routines=not args.no_fast_routines, explain=True,
                        count_blocks=not args.no_block_counting)
    result = executor.run(data)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(render_result(result, log_lines=args.log_lines))
    return EXIT_CRASH if result.verdict == "crash" else EXIT_OK


def _check_profile(args: argparse.Namespace) -> int:
    """Is the profile good enough to fuzz with? Boots a valid input (the given ELF, else the
    built-in example) and says what holds."""
    from kernel_emu.draft import check_profile

    data = _read_input(args.elf) if args.elf else (EXAMPLES / "three-segments.elf").read_bytes()
    checks = check_profile(args.kernel, data)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.what}" + (f" ({c.detail})" if c.detail else ""))
    good = all(c.ok for c in checks)
    print("the profile is good to fuzz with" if good else
          "the profile needs work: see FAIL above")
    return EXIT_OK if good else EXIT_CRASH


def _boot_application(args: argparse.Namespace) -> int:
    """Any UEFI application, run by the emulated firmware with no input."""
    from kernel_emu.efiapp import run_app
    from kernel_emu.errors import ImageError

    if args.elf is not None:
        raise UsageError("--no-input runs the application by itself: give no ELF")
    path = Path(args.kernel)
    head = _read_input(args.kernel)[:2]
    if head != b"MZ":
        raise UsageError(f"{args.kernel} is not a UEFI application (PE32+ image)")
    try:
        run = run_app(path)
    except ImageError as e:
        raise UsageError(str(e)) from None
    status = "" if run.efi_main_status is None else f", efi_main returned {run.efi_main_status:#x}"
    print(f"{path.name}: stopped: {run.stop}{status} after {run.instructions:,} instructions")
    if run.fault:
        print(f"fault: {run.fault}")
    for label, text in (("console (ConOut)", run.console), ("debug console (port 0xE9)",
                                                            run.debug)):
        if text.strip():
            print(f"{label}:")
            for line in text.replace("\r\n", "\n").strip("\n").splitlines()[-20:]:
                print(f"  | {line}")
    print(f"services called: {len(run.calls)}"
          + (f", last: {', '.join(run.calls[-3:])}" if run.calls else ""))
    if run.unsupported:
        print("asked for what this machine does not provide: " + ", ".join(run.unsupported))
    return EXIT_CRASH if run.fault else EXIT_OK


def cmd_crosscheck(args: argparse.Namespace) -> int:
    """The same UEFI image and input in the emulator and on QEMU + OVMF, logs compared."""
    from kernel_emu import qemu
    from kernel_emu.crosscheck import crosscheck, is_uefi
    from kernel_emu.profile import load_profile

    profile = load_profile(args.kernel)
    if not is_uefi(profile):
        raise UsageError(f"kernel {profile.name} is not a UEFI application: crosscheck boots "
                         f"what real firmware boots (seed, fixed, or a profile of a .efi "
                         f"image)")
    data = _read_input(args.elf)
    missing = qemu.missing()
    if missing:
        raise UsageError(f"cannot boot on real firmware here: {missing}")
    try:
        check = crosscheck(profile, data, timeout=args.timeout)
    except qemu.FirmwareBootError as e:
        raise HarnessError(str(e)) from None
    result = check.result
    print(f"crosscheck of {args.elf} on {profile.name} ({profile.image.name}), loaded by the "
          f"firmware at {check.load_base:#x} (and so in the emulator): emulator "
          f"{check.seconds_emulated:.2f} s, QEMU + OVMF {check.seconds_real:.1f} s "
          f"({check.real_ended})")
    print(f"emulated: {result.verdict}" + (f", {result.signature}" if result.signature else ""))
    print(f"kernel log, {len(check.emulated)} lines compared (what differs by machine as …):")
    differing = {line for line, _a, _b in check.differences}
    for i, line in enumerate(check.emulated, 1):
        if i in differing:
            print(f"  ! emulator: {line}")
            print(f"    real:     {check.real[i - 1] if i <= len(check.real) else '(nothing)'}")
        else:
            print(f"  = {line}")
    for i, _a, b in check.differences:
        if i > len(check.emulated):
            print(f"  ! real only: {b}")
    if check.after:
        print("after the emulated run ended, on QEMU + OVMF:")
        for line in check.after:
            print(f"  + {line}")
    if check.same:
        print("same kernel log on real firmware")
        return EXIT_OK
    print(f"{len(check.differences)} line(s) differ between the emulator and real firmware")
    return EXIT_CRASH


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the bundled examples on the built-in builds: the farm's job in miniature."""
    from fuzzfarm.report import render_summary_row
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    examples = sorted(EXAMPLES.glob("*.elf"))
    if not examples:
        raise HarnessError(f"no example ELFs in {EXAMPLES}")
    print(f"{'input':<28} {'kernel':<8} {'verdict':<9} finding")
    for kernel in ("seed", "upstream", "fixed"):
        executor = Executor(load_profile(kernel))
        for path in examples:
            result = executor.run(path.read_bytes())
            print(render_summary_row(path.name, kernel, result))
    print("\nFor the whole story of one boot: fuzzfarm boot --kernel seed "
          f"{EXAMPLES.relative_to(Path.cwd()) if EXAMPLES.is_relative_to(Path.cwd()) else EXAMPLES}"
          "/vaddr-0x300028.elf")
    return EXIT_OK


# fuzz -------------------------------------------------------------------------------------

def _seed_dirs(values: list[str] | None) -> list[str]:
    import corpus

    dirs = values or [str(Path(corpus.__file__).parent / "seeds")]
    for d in dirs:
        if not Path(d).is_dir():
            raise UsageError(f"seed directory not found: {d}")
    return [str(Path(d).resolve()) for d in dirs]


def cmd_fuzz(args: argparse.Namespace) -> int:
    from fuzz.campaign import findings_table, run_campaign
    from fuzz.harness import JobConfig
    from kernel_emu.profile import load_profile

    load_profile(args.kernel)  # a bad kernel is one error here, not one per job
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    if args.runs is not None and args.runs <= 0:
        raise UsageError("--runs must be positive")
    out = Path(args.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {args.out}: {e.strerror}") from None
    from kernel_emu.profile import BUILTIN_PROFILES, ELF_PROFILES

    kernel = args.kernel if args.kernel in BUILTIN_PROFILES + ELF_PROFILES \
        else str(Path(args.kernel).resolve())
    config = JobConfig(kernel=kernel, out=str(out), seeds=_seed_dirs(args.seeds),
                       seconds=args.seconds if args.seconds or args.runs else 60.0,
                       runs=args.runs, coverage=not args.no_feedback,
                       compares=not args.no_feedback and not args.no_compares,
                       mutator=not args.no_elf_mutator, native=not args.no_native,
                       fast_routines=not args.no_fast_routines,
                       skip_cycles=not args.no_cycle_skip,
                       count_blocks=not args.no_block_counting)
    print(f"fuzzing kernel {args.kernel} with {args.jobs} job(s); output in {args.out}",
          file=sys.stderr)
    summary = run_campaign(config, args.jobs)
    print(f"\n{summary.execs:,} execs in {summary.seconds:.1f} s "
          f"({summary.execs_per_second:,.0f}/s), {summary.edges} edges, "
          f"corpus {summary.corpus}\n")
    print(findings_table(summary))
    for failure in summary.job_failures:
        print(f"fuzzfarm: {failure}", file=sys.stderr)
    if summary.harness_errors:
        print(f"fuzzfarm: {summary.harness_errors} harness error(s), not counted as findings: "
              f"see {Path(args.out) / 'harness-errors'}", file=sys.stderr)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    if summary.job_failures and summary.execs == 0:
        return EXIT_ERROR
    return EXIT_CRASH if summary.buckets else EXIT_OK


def cmd_minimize(args: argparse.Namespace) -> int:
    from fuzz.minimize import run

    if args.bucket:
        if args.crash:
            raise UsageError("give either CRASH or --bucket, not both")
        from fuzzfarm.farm_cli import minimize_bucket

        return minimize_bucket(args)
    if not args.crash:
        raise UsageError("minimize needs a CRASH file (or --bucket ID for a farm bucket)")
    return run(args)


def cmd_seeds(args: argparse.Namespace) -> int:
    from corpus.seeds import main as seeds_main

    return seeds_main(["--out", args.out] if args.out else [])


# build-guest ------------------------------------------------------------------------------

def cmd_build_guest(args: argparse.Namespace) -> int:
    from functools import partial

    from kernel_emu.guest_build import VARIANTS, GuestBuildError, build_all
    from kernel_emu.uefi_build import SHIM, missing_toolchain
    from kernel_emu.uefi_build import build as build_uefi

    out = Path(args.out)
    missing = missing_toolchain()
    if missing:
        raise HarnessError(f"cannot build the UEFI images: {missing}")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # entries named as the profiles: the UEFI builds are the built-in seed and fixed
    more = {v: partial(build_uefi, v, progress=say) for v in VARIANTS}
    more[SHIM] = partial(build_uefi, SHIM, progress=say)
    try:
        manifest = build_all(out, more=more)
    except GuestBuildError as e:
        detail = getattr(e, "stderr", "")
        if detail:
            print(detail, file=sys.stderr)
        raise HarnessError(str(e)) from e
    for name, entry in sorted(manifest.get("images", manifest).items()):
        if isinstance(entry, dict) and "sha256" in entry:
            print(f"{name:<11} {entry['sha256']}  {entry.get('size', '?')} bytes")
    print(f"wrote {out / 'manifest.json'}")
    return EXIT_OK


# bench ------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from fuzzfarm.bench import bench_boot

    kernel = args.kernel or "seed"
    args.race_seconds = args.seconds  # before the other benchmarks' default
    if args.what == "bugs":
        from fuzzfarm.bench_bugs import bench_bugs
        from kernel_emu.profile import load_profile

        if args.rebucket:
            from fuzzfarm.bench_bugs import rebucket

            source = Path(args.rebucket)
            try:
                return rebucket(source, Path(args.out or source / "rebucketed"))
            except ValueError as e:
                raise UsageError(str(e)) from None
        kernels = (args.kernel or "seed,fixed").split(",")
        if args.trials is None:
            args.trials = 10
        if args.trials < 1 or (args.seconds is not None and args.seconds <= 0) or args.jobs < 1:
            raise UsageError("--trials and --jobs must be at least 1, --seconds above 0")
        for name in kernels:
            load_profile(name)  # an unknown build is a usage error before anything runs
        return bench_bugs(kernels, args.trials, args.seconds or 600.0, args.jobs,
                          Path(args.out or "out/bench-bugs"))
    args.kernel = kernel
    if args.seconds is None:
        args.seconds = 30.0
    if args.what == "boot":
        return bench_boot(kernel=args.kernel, runs=args.runs, repeats=args.repeats,
                          native=not args.no_native)
    if args.what == "farm":
        from fuzzfarm.bench_farm import bench_farm

        return bench_farm(seconds=args.farm_seconds, slice_seconds=args.slice_seconds,
                          repeats=args.farm_repeats, cap=args.bug_cap)
    if args.what == "fuzz":
        from fuzzfarm.bench_fuzz import bench_fuzz

        other = None
        if args.other:
            other = Path(args.other).resolve()
            if not (other / "fuzz" / "harness.py").is_file():
                raise UsageError(f"--other {args.other}: not a checkout of this project")
        try:
            return bench_fuzz(kernel=args.kernel, seconds=args.seconds, repeats=args.repeats,
                              first_runs=args.first_runs, bug_seconds=args.bug_seconds,
                              first_cap=args.first_cap, fixed_seconds=args.fixed_seconds,
                              parts=args.parts, other=other)
        except RuntimeError as e:
            print(f"fuzzfarm: error: {e}", file=sys.stderr)
            return 2
    if args.what == "compare" and not args.other and not args.other_kernel:
        return _race(args)
    if args.what == "compare":
        from fuzzfarm.bench_compare import bench_compare

        return bench_compare(args.other, kernel=args.kernel, rounds=args.repeats,
                             runs=args.runs, inputs=args.inputs or 1000,
                             other_kernel=args.other_kernel)
    if args.what == "hostile":
        from fuzzfarm.bench_hostile import bench_hostile

        if args.inputs is not None and args.inputs < 1:
            raise UsageError("--inputs must be at least 1")
        return bench_hostile(kernel=args.kernel, inputs=args.inputs or 1_000_000,
                             seed=args.seed)
    if args.what == "tracer":
        from kernel_emu.native import bench_tracer

        bench_tracer.main(repeats=args.repeats)
        return EXIT_OK
    raise UsageError(f"unknown benchmark '{args.what}'")


def _race(args: argparse.Namespace) -> int:
    from fuzzfarm.bench_race import COMPETITORS, bench_race
    from kernel_emu.profile import load_profile

    picked = [c.strip() for c in (args.competitors or ",".join(COMPETITORS)).split(",")
              if c.strip()]
    unknown = [c for c in picked if c not in COMPETITORS]
    if unknown or not picked:
        raise UsageError(f"--competitors: unknown {', '.join(unknown) or '(none given)'}; "
                         f"pick from {','.join(COMPETITORS)}")
    if args.trials is not None and args.trials < 1:
        raise UsageError("--trials must be at least 1")
    seconds = args.race_seconds if args.race_seconds is not None else 300.0
    if seconds <= 0:
        raise UsageError("--seconds must be above 0")
    load_profile(args.kernel)  # an unknown build is a usage error before anything runs
    return bench_race(args.kernel, list(dict.fromkeys(picked)), seconds,
                      args.trials or 1, Path(args.out or "out/bench-compare"))


# ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuzzfarm",
        description="Fuzz the ELF loader and heap allocator of the Rustux kernel, booted under "
                    "an emulated amd64 UEFI machine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("boot", help="boot one ELF as the kernel's bin/init and report",
                       description="Boot a Rustux kernel with ELF as its bin/init and say what "
                                   "happened; with --no-input, run any UEFI application on the "
                                   "emulated firmware and say what it printed and asked for. "
                                   "Exit status: 0 ok or rejected, 1 crash (or fault), 2 "
                                   "error.")
    p.add_argument("elf", metavar="ELF", nargs="?", help="the input file (any bytes)")
    p.add_argument("--no-input", action="store_true",
                   help="run the UEFI application given as --kernel APP.efi by itself, with "
                        "no input and no profile")
    p.add_argument("--kernel", default="seed", metavar="seed|fixed|upstream|PROFILE.toml",
                   help="kernel build: a built-in profile or a profile file (default: seed)")
    p.add_argument("--full-boot", action="store_true",
                   help="boot from power-on instead of restoring the snapshot")
    p.add_argument("--check", action="store_true",
                   help="check that the --kernel profile is good to fuzz with: its symbols, "
                        "snapshot and success points and heap, on ELF or on the built-in "
                        "example (exit status 1 if not)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--log-lines", type=int, default=12, metavar="N",
                   help="lines of kernel log to show (default: 12)")
    p.add_argument("--no-native", action="store_true",
                   help="use the pure-Python hooks instead of the native tracer (slow)")
    p.add_argument("--no-fast-routines", action="store_true", help=FAST_ROUTINES_HELP)
    p.add_argument("--no-block-counting", action="store_true", help=BLOCK_COUNTING_HELP)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("crosscheck", help="boot one input in the emulator and on QEMU + OVMF",
                       description="Boot a UEFI build of the kernel with ELF as its bin/init "
                                   "twice, in the emulator and on real firmware (QEMU + OVMF), "
                                   "and compare the kernel's logs line by line after "
                                   "normalising what differs by machine (load addresses, the "
                                   "memory map). Exit status: 0 same, 1 different, 2 error.")
    p.add_argument("elf", metavar="ELF", help="the input file (any bytes)")
    p.add_argument("--kernel", default="seed", metavar="seed|fixed|upstream|PROFILE.toml",
                   help="a UEFI build: a built-in profile or a profile file (default: seed)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long the boot on QEMU may take (default: 120)")
    p.set_defaults(func=cmd_crosscheck)

    p = sub.add_parser("fuzz", help="fuzz the kernel's ELF loader locally",
                       description="Run a coverage-guided campaign (Atheris/libFuzzer fed with "
                                   "guest coverage and compares) on one kernel build, with a "
                                   "live progress line, then print the findings by signature. "
                                   "Exit status: 0 nothing found, 1 findings, 2 error.")
    p.add_argument("--kernel", default="seed", metavar="seed|fixed|upstream|PROFILE.toml",
                   help="kernel build (default: seed)")
    p.add_argument("--seconds", type=float, default=None, metavar="N",
                   help="how long to fuzz (default: 60, or unlimited with --runs)")
    p.add_argument("--runs", type=int, default=None, metavar="N",
                   help="stop each job after N executions instead (with no --seconds)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="parallel fuzzing processes sharing one corpus (default: 1)")
    p.add_argument("--out", default="out/fuzz", metavar="DIR",
                   help="corpus, findings and logs go here (default: out/fuzz)")
    p.add_argument("--seeds", action="append", metavar="DIR",
                   help="seed corpus directory, repeatable (default: the bundled corpus/seeds)")
    p.add_argument("--no-feedback", action="store_true",
                   help="no guest coverage or compares (for measuring their cost)")
    p.add_argument("--no-compares", action="store_true", help="guest coverage only")
    p.add_argument("--no-elf-mutator", action="store_true",
                   help="only libFuzzer's byte-level mutations")
    p.add_argument("--no-native", action="store_true",
                   help="pure-Python hooks instead of the native ones (slow)")
    p.add_argument("--no-fast-routines", action="store_true", help=FAST_ROUTINES_HELP)
    p.add_argument("--no-cycle-skip", action="store_true",
                   help="run every instruction of an endless loop up to the watchdog instead "
                        "of skipping its exact repetitions (same results, slower)")
    p.add_argument("--no-block-counting", action="store_true", help=BLOCK_COUNTING_HELP)
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("minimize", help="shrink a crashing input, keeping its signature",
                       description="Shrink a crashing input while it keeps crashing with the "
                                   "same signature: structure-aware passes (program headers, "
                                   "fields, segment data, section headers), then byte-level "
                                   "delta debugging. Exit status: 0 done, 2 error (including "
                                   "an input that does not crash).")
    from fuzz.minimize import add_arguments as add_minimize_arguments

    add_minimize_arguments(p, crash_optional=True)
    p.add_argument("--bucket", default=None, metavar="ID",
                   help="minimize a farm bucket's reproducer on the farm's workers instead")
    p.add_argument("--wait", type=float, default=900.0, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="with --bucket: the farm's Redis (default: $REDIS_URL)")
    p.set_defaults(func=cmd_minimize)

    from fuzzfarm.farm_cli import add_parsers as add_farm_parsers

    add_farm_parsers(sub)

    p = sub.add_parser("seeds", help="regenerate the seed corpus with gcc and LIEF",
                       description="Rebuild the seed ELFs (gcc-compiled templates edited with "
                                   "LIEF) and their manifest.json.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: the package's corpus/seeds)")
    p.set_defaults(func=cmd_seeds)

    p = sub.add_parser("demo", help="boot the bundled example ELFs on the built-in kernel builds",
                       description="Boot every bundled example ELF on the seed, upstream and "
                                   "fixed builds and print one line per boot.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build-guest", help="rebuild the Rustux boot images from source",
                       description="Rebuild kernel_emu/images from the guest source: the seed "
                                   "and fixed builds as static ELF images and as UEFI "
                                   "applications (PE32+, with a link map), and write their "
                                   "manifest. The UEFI build needs a rustc with its library "
                                   "sources and lld-link (Debian: rustc-web, rust-web-src, "
                                   "lld).")
    p.add_argument("--out", default=str(Path(__file__).parent.parent / "kernel_emu" / "images"),
                   help="output directory (default: the package's images directory)")
    p.set_defaults(func=cmd_build_guest)

    p = sub.add_parser("bench", help="benchmarks (boot, fuzz, bugs, farm, tracer, compare, "
                                     "hostile)",
                       description="Measure throughput; prints medians and ratios. boot: "
                                   "snapshot versus full boot. fuzz: feedback cost, time to "
                                   "the seed bug with 1 and 2 jobs, BUGS.md bugs found. bugs: "
                                   "trials per build of planted bugs reached, triggered and "
                                   "bucketed (canaries), Kaplan-Meier time to bug, buckets per "
                                   "bug, survival curves as SVG, JSON. farm: "
                                   "execs/s with 1 and 2 workers, Redis commands per 1,000 "
                                   "execs, time from `fuzzfarm up` to the seed bug minimized. "
                                   "tracer: nanoseconds per guest instruction of the tracing "
                                   "hooks, native versus Python. compare: with --other, this "
                                   "checkout's emulator against another checkout's, side by "
                                   "side; without, a race of fuzzers on one build (the farm, "
                                   "AFL++ Unicorn mode, a plain Unicorn fuzzer, qiling), same "
                                   "seeds and wall time, execs/s per core and time to each "
                                   "planted bug. hostile: a storm of hostile inputs (random, "
                                   "truncated, bit-flipped, extreme header fields) run as a "
                                   "fuzzing job runs them; counts per family, verdicts, "
                                   "harness errors, rate; exit status 1 on any harness "
                                   "error.")
    p.add_argument("what", choices=["boot", "fuzz", "bugs", "farm", "tracer", "compare",
                                    "hostile"],
                   help="what to measure")
    p.add_argument("--kernel", default=None,
                   help="kernel build (default: seed; bugs: a comma-separated list, default "
                        "seed,fixed)")
    p.add_argument("--runs", type=int, default=400, help="snapshot runs per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats; medians are reported")
    p.add_argument("--no-native", action="store_true", help="pure-Python hooks")
    p.add_argument("--seconds", type=float, default=None,
                   help="fuzz: length of each feedback on/off campaign (default: 30); bugs: "
                        "length of each trial (default: 600); compare (race): wall time of "
                        "each competitor per trial (default: 300)")
    p.add_argument("--trials", type=int, default=None,
                   help="bugs: trials per build (default: 10); compare (race): trials per "
                        "competitor (default: 1)")
    p.add_argument("--jobs", type=int, default=2,
                   help="bugs: fuzzing jobs per trial (default: 2)")
    p.add_argument("--out", default=None,
                   help="bugs: where results, trials and plots go (default: out/bench-bugs); "
                        "compare (race): race.json, the exported snapshot and each "
                        "competitor's saved inputs (default: out/bench-compare)")
    p.add_argument("--competitors", default=None, metavar="LIST",
                   help="compare (race): which competitors, comma-separated, from farm,afl,"
                        "unicorn,qiling (default: all four)")
    p.add_argument("--first-runs", type=int, default=5,
                   help="fuzz: campaigns per job count for the time to the seed bug")
    p.add_argument("--first-cap", type=float, default=120.0,
                   help="fuzz: give up on one such campaign after this many seconds")
    p.add_argument("--bug-seconds", type=float, default=300.0,
                   help="fuzz: length of the known-bugs campaign on seed (default: 300)")
    p.add_argument("--fixed-seconds", type=float, default=600.0,
                   help="fuzz: length of the campaign on fixed (default: 600)")
    p.add_argument("--farm-seconds", type=float, default=120.0,
                   help="farm: steady-state window per run (default: 120)")
    p.add_argument("--slice-seconds", type=float, default=60.0,
                   help="farm: length of a fuzz slice (default: 60)")
    p.add_argument("--farm-repeats", type=int, default=1,
                   help="farm: runs per worker count (default: 1)")
    p.add_argument("--bug-cap", type=float, default=300.0,
                   help="farm: give up waiting for the seed bug after this many seconds")
    p.add_argument("--rebucket", metavar="DIR",
                   help="bugs: judge the trials of an earlier run (DIR/bugs.json) again with "
                        "this checkout's oracles and signatures, without fuzzing again "
                        "(results in --out, default DIR/rebucketed)")
    p.add_argument("--other", metavar="DIR",
                   help="compare: the other checkout (its native hooks built); fuzz: also "
                        "run part 1's default campaigns with that checkout's code, "
                        "interleaved, for the figure before a change")
    p.add_argument("--other-kernel", metavar="KERNEL",
                   help="compare: another kernel build to measure against --kernel (e.g. "
                        "seed-elf against seed: the ELF and the UEFI image)")
    p.add_argument("--inputs", type=int, default=None,
                   help="compare: mutated seeds replayed as a fuzzing job runs them "
                        "(default: 1000); hostile: inputs in the storm (default: 1000000)")
    p.add_argument("--seed", type=int, default=1,
                   help="hostile: seed of the input generator, for a repeatable storm "
                        "(default: 1)")
    p.add_argument("--parts", default="123",
                   help="fuzz: which parts to run: 1 feedback cost, 2 time to the bug, "
                        "3 known bugs (default: 123)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # the reader went away (`fuzzfarm … | head`): stop quietly, as other Unix tools do;
        # output still buffered would fail again at exit, so it goes nowhere instead
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors exit here, through SystemExit
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, FarmUsageError, SettingsError) as e:
        print(f"fuzzfarm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except HarnessError as e:
        print(f"fuzzfarm: harness error: {e}", file=sys.stderr)
        if os.environ.get("FUZZFARM_DEBUG"):
            traceback.print_exc()
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fuzzfarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
