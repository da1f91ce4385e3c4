"""The system packages the farm needs besides Python packages, checked and, as root on Debian or
Ubuntu, installed: `python3 fuzzfarm/system_deps.py setup|test`.

`setup` is what `make up` needs (a Python with venv and headers, a C compiler for the native
hooks); `test` adds what the tests need (readelf as a reference ELF reader; Chromium and
chromedriver for the dashboard's browser tests; the UEFI toolchain, QEMU and OVMF for the
UEFI images and their boot on real firmware); `uefi` is that last part alone. Without root,
a missing required package stops with one line naming the command to run; missing optional
parts only mean the tests that need them are skipped, and that is said. Standard library
only: it runs before the virtualenv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Need:
    what: str
    package: str  # Debian's package name
    present: Callable[[], bool]
    why: str
    required: bool = True


def _which(*names: str) -> Callable[[], bool]:
    return lambda: any(shutil.which(n) for n in names)


def _venv() -> bool:
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


def _headers() -> bool:
    include = sysconfig.get_paths().get("include")
    return bool(include) and (Path(include) / "Python.h").is_file()


def _rust_library_sources() -> bool:
    return any(Path("/usr/src").glob("rustc-*/library/core/src/lib.rs"))


def _ovmf() -> bool:
    return Path("/usr/share/ovmf/OVMF.fd").is_file()


# the guest as a UEFI application (`fuzzfarm build-guest`), and real firmware to boot it on
UEFI = [
    Need("Debian's rustc", "rustc-web", lambda: Path("/usr/bin/rustc").is_file(),
         "building the UEFI images", required=False),
    Need("the Rust library sources", "rust-web-src", _rust_library_sources,
         "building the UEFI images", required=False),
    Need("lld-link", "lld", _which("lld-link"), "building the UEFI images", required=False),
    Need("QEMU", "qemu-system-x86", _which("qemu-system-x86_64"),
         "booting the UEFI images on real firmware", required=False),
    Need("OVMF", "ovmf", _ovmf, "booting the UEFI images on real firmware", required=False),
    # UEFI applications others built, to run on the emulated firmware
    Need("memtest86+ (a UEFI application)", "memtest86+",
         lambda: Path("/boot/memtest86+x64.efi").is_file(),
         "running third-party UEFI applications on the emulated firmware", required=False),
    Need("systemd-boot (a UEFI application)", "systemd-boot-efi",
         lambda: Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").is_file(),
         "running third-party UEFI applications on the emulated firmware", required=False),
]
TARGETS_HELP = "setup: what `make up` needs; test: what the tests need; uefi: the UEFI images"

SETUP = [
    Need("Python's venv and ensurepip", "python3-venv", _venv, "the project's virtualenv"),
    Need("a C compiler (gcc)", "gcc", _which("gcc", "cc"), "compiling the native hooks"),
    Need("the Python headers", "python3-dev", _headers, "compiling the native hooks"),
]
TEST = [
    *SETUP,
    Need("readelf", "binutils", _which("readelf"),
         "the tests compare the farm's ELF reader with readelf"),
    Need("Chromium", "chromium", _which("chromium", "chromium-browser"),
         "the dashboard's browser tests", required=False),
    Need("chromedriver", "chromium-driver", _which("chromedriver"),
         "the dashboard's browser tests", required=False),
    Need("afl-fuzz", "afl++", _which("afl-fuzz"),
         "the race of `fuzzfarm bench compare` (AFL++ in Unicorn mode)", required=False),
    *UEFI,
]
TARGETS = {"setup": SETUP, "test": TEST, "uefi": UEFI}


def say(line: str) -> None:
    print(f"fuzzfarm: {line}", file=sys.stderr, flush=True)


def apt_install(packages: list[str]) -> bool:
    """apt-get update and install, quietly; on failure the tail of apt's output is shown."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with tempfile.TemporaryFile("w+") as log:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *packages]):
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode != 0:
                log.seek(0)
                tail = log.read().strip().splitlines()[-5:]
                say(f"{' '.join(cmd)} failed:")
                for line in tail:
                    print(f"    {line}", file=sys.stderr)
                return False
    return True


def ensure(needs: list[Need]) -> int:
    missing = [n for n in needs if not n.present()]
    if not missing:
        return 0
    packages = sorted({n.package for n in missing})
    apt = shutil.which("apt-get")
    if os.geteuid() == 0 and apt:
        say(f"installing from the system's packages: {' '.join(packages)} (for "
            + "; ".join(sorted({n.why for n in missing})) + ")")
        apt_install(packages)
        missing = [n for n in missing if not n.present()]
        if not missing:
            return 0
    how = (f"sudo apt-get install {' '.join(sorted({n.package for n in missing}))}" if apt
           else "install " + ", ".join(n.what for n in missing) + " with the system's "
           "package manager")
    required = [n for n in missing if n.required]
    if required:
        say(f"missing {', '.join(n.what for n in required)} (for "
            + "; ".join(sorted({n.why for n in required})) + f"); to install: {how}")
        return 2
    say(f"{' and '.join(n.what for n in missing)} not installed, so "
        + "; ".join(sorted({n.why for n in missing})) + f" will be skipped; to run them: {how}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in TARGETS:
        print(f"usage: {Path(__file__).name} {'|'.join(TARGETS)}\n{TARGETS_HELP}",
              file=sys.stderr)
        return 2
    return ensure(TARGETS[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
