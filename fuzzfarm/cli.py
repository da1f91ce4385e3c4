"""`fuzzfarm`: the command line of the Rustux fuzz farm."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from kernel_emu.errors import HarnessError

EXIT_OK, EXIT_CRASH, EXIT_ERROR = 0, 1, 2
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


# boot -------------------------------------------------------------------------------------

def cmd_boot(args: argparse.Namespace) -> int:
    from fuzzfarm.report import render_result
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    profile = load_profile(args.kernel)
    data = _read_input(args.elf)
    executor = Executor(profile, snapshot=not args.full_boot, native=not args.no_native)
    result = executor.run(data)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(render_result(result, log_lines=args.log_lines))
    return EXIT_CRASH if result.verdict == "crash" else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the bundled examples on both builds: the farm's job in miniature."""
    from fuzzfarm.report import render_summary_row
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    examples = sorted(EXAMPLES.glob("*.elf"))
    if not examples:
        raise HarnessError(f"no example ELFs in {EXAMPLES}")
    print(f"{'input':<28} {'kernel':<6} {'verdict':<9} finding")
    for kernel in ("seed", "fixed"):
        executor = Executor(load_profile(kernel))
        for path in examples:
            result = executor.run(path.read_bytes())
            print(render_summary_row(path.name, kernel, result))
    print("\nFor the whole story of one boot: fuzzfarm boot --kernel seed "
          f"{EXAMPLES.relative_to(Path.cwd()) if EXAMPLES.is_relative_to(Path.cwd()) else EXAMPLES}"
          "/vaddr-0x300028.elf")
    return EXIT_OK


# build-guest ------------------------------------------------------------------------------

def cmd_build_guest(args: argparse.Namespace) -> int:
    from kernel_emu.guest_build import GuestBuildError, build_all

    out = Path(args.out)
    try:
        manifest = build_all(out)
    except GuestBuildError as e:
        detail = getattr(e, "stderr", "")
        if detail:
            print(detail, file=sys.stderr)
        raise HarnessError(str(e)) from e
    for name, entry in sorted(manifest.get("images", manifest).items()):
        if isinstance(entry, dict) and "sha256" in entry:
            print(f"{name:<6} {entry['sha256']}  {entry.get('size', '?')} bytes")
    print(f"wrote {out / 'manifest.json'}")
    return EXIT_OK


# bench ------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from fuzzfarm.bench import bench_boot

    if args.what == "boot":
        return bench_boot(kernel=args.kernel, runs=args.runs, repeats=args.repeats,
                          native=not args.no_native)
    raise UsageError(f"unknown benchmark '{args.what}'")


# ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuzzfarm",
        description="Fuzz the ELF loader and heap allocator of the Rustux kernel, booted under "
                    "an emulated amd64 UEFI machine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("boot", help="boot one ELF as the kernel's bin/init and report",
                       description="Boot a Rustux kernel with ELF as its bin/init and say what "
                                   "happened. Exit status: 0 ok or rejected, 1 crash, 2 error.")
    p.add_argument("elf", metavar="ELF", help="the input file (any bytes)")
    p.add_argument("--kernel", default="seed", metavar="seed|fixed|PROFILE.toml",
                   help="kernel build: a built-in profile or a profile file (default: seed)")
    p.add_argument("--full-boot", action="store_true",
                   help="boot from power-on instead of restoring the snapshot")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--log-lines", type=int, default=12, metavar="N",
                   help="lines of kernel log to show (default: 12)")
    p.add_argument("--no-native", action="store_true",
                   help="use the pure-Python hooks instead of the native tracer (slow)")
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("demo", help="boot the bundled example ELFs on both kernel builds",
                       description="Boot every bundled example ELF on the seed and fixed builds "
                                   "and print one line per boot.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build-guest", help="rebuild the Rustux boot images from source",
                       description="Rebuild kernel_emu/images (seed and fixed) with the host "
                                   "rustc and write their manifest.")
    p.add_argument("--out", default=str(Path(__file__).parent.parent / "kernel_emu" / "images"),
                   help="output directory (default: the package's images directory)")
    p.set_defaults(func=cmd_build_guest)

    p = sub.add_parser("bench", help="benchmarks (boot)",
                       description="Measure throughput; prints medians and ratios.")
    p.add_argument("what", choices=["boot"], help="what to measure")
    p.add_argument("--kernel", default="seed", help="kernel build (default: seed)")
    p.add_argument("--runs", type=int, default=400, help="snapshot runs per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats; medians are reported")
    p.add_argument("--no-native", action="store_true", help="pure-Python hooks")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
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
