"""Builds the Rustux guest as what Rustux really is: a UEFI application (PE32+, subsystem 10,
with base relocations), for the `x86_64-unknown-uefi` target.

No prebuilt standard library exists for that target here, so the build makes its own: `core`,
`compiler_builtins` and `alloc` compiled from the Rust library sources of the same compiler
(`RUSTC_BOOTSTRAP=1` lets a stable rustc build them) into a private sysroot, cached per
compiler under `$XDG_CACHE_HOME/fuzzfarm/uefi-sysroot/` (~45 s the first time). The kernel
then links with `lld-link` in reproducible mode (`/Brepro`: no time stamp, a PDB signature
that is a hash of its contents) and writes a link map beside the image: the map's public and
static symbols are where the farm's symbol names come from for a PE image (it has no symbol
table of its own). Source lines come from a DWARF companion, `<image stem>.debug`: the same
objects linked a second time with `/DEBUG:DWARF` (a PE whose `.debug_*` sections hold line
tables for the same code at the same addresses; the build checks that its `.text` is the
image's). The image itself carries no debug information, and no PDB is written: it would
carry the build's absolute paths, and in reproducible mode its hash goes into the image.

What it needs, all from Debian: `rustc-web` (a rustc), `rust-web-src` (its library sources, in
`/usr/src/rustc-<release>/library`) and `lld` (`lld-link`). A rustc is usable when its
library sources are found: `$RUST_LIBRARY_SRC`, rustup's `rust-src` layout
(`<sysroot>/lib/rustlib/src/rust/library`) or Debian's. `lld-link` is taken from PATH, else
the compiler's own `rust-lld` in link mode.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from kernel_emu.guest_build import (
    BUILD_TIMEOUT_S,
    GUEST_DIR,
    VARIANTS,
    GuestBuildError,
    rustc_candidates,
    rustc_version,
)

TARGET = "x86_64-unknown-uefi"
# how the sysroot's crates are built; part of the cache key
# legacy symbol mangling, as the ELF build's compiler uses: the same demangled names in both
_MANGLING = ["-Z", "unstable-options", "-C", "symbol-mangling-version=legacy"]
# frame pointers and unwind tables in the library too: backtraces through core (the panic
# machinery, formatting) walk as far as through the kernel
_LIBRARY_FLAGS = ["-C", "opt-level=2", "-C", "panic=abort", "-C", "codegen-units=1",
                  "-C", "force-frame-pointers=yes", "-C", "force-unwind-tables=yes",
                  "-Z", "force-unstable-if-unmarked", *_MANGLING]
# what compiler_builtins' build script would set for this target
_BUILTINS_CFG = ['feature="compiler-builtins"', 'feature="mem"', 'feature="unstable-intrinsics"',
                 "intrinsics_enabled", "arch_enabled", "optimizations_enabled", "f16_enabled"]
_KERNEL_FLAGS = [
    "--edition", "2021",
    "--crate-type", "bin",
    "--crate-name", "rustux",
    "--target", TARGET,
    "-C", "panic=abort",
    "-C", "opt-level=2",
    "-C", "codegen-units=1",
    # line tables in DWARF (LLVM emits it beside the target's CodeView when asked): the
    # image itself is linked without debug information, byte for byte the same; the same
    # objects linked again with /DEBUG:DWARF make its companion `<variant>.debug`
    "-C", "debuginfo=line-tables-only",
    "-Zllvm-module-flag=Dwarf Version:u32:4:max",
    "-C", "force-frame-pointers=yes",
    # .pdata/.xdata for every function: how to walk the Microsoft x64 frames in backtraces
    "-C", "force-unwind-tables=yes",
    "-C", "link-arg=/Brepro",
    "-C", "link-arg=/DEBUG:NONE",
    *_MANGLING,
    "--check-cfg", "cfg(rustux_fixed, rustux_upstream)",
]
# where the library sources are said to be in the images' strings (panic locations)
LIBRARY_REMAP = "/rustc/library"


def library_source(rustc: str) -> Path | None:
    """The Rust library sources that belong to `rustc`, or None."""
    candidates = []
    if os.environ.get("RUST_LIBRARY_SRC"):
        candidates.append(Path(os.environ["RUST_LIBRARY_SRC"]))
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout.strip()
        release = rustc_version(rustc).split("release: ")[1].split(";")[0]
    except (OSError, subprocess.SubprocessError, GuestBuildError, IndexError):
        return None
    if sysroot:
        candidates.append(Path(sysroot) / "lib" / "rustlib" / "src" / "rust" / "library")
    candidates.append(Path("/usr/src") / f"rustc-{release}" / "library")
    for library in candidates:
        if (library / "core" / "src" / "lib.rs").is_file() and \
                (library / "compiler-builtins" / "compiler-builtins" / "src" / "lib.rs").is_file():
            return library
    return None


def find_uefi_rustc() -> tuple[str, Path] | None:
    """The first rustc (same order as the ELF build) whose library sources are found."""
    for rustc in rustc_candidates() + ["/usr/bin/rustc"]:
        library = library_source(rustc)
        if library is not None:
            return rustc, library
    return None


def find_linker(rustc: str) -> list[str] | None:
    """`lld-link` from PATH, else the compiler's `rust-lld -flavor link`."""
    lld_link = shutil.which("lld-link")
    if lld_link:
        return [lld_link]
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    for rust_lld in Path(sysroot, "lib", "rustlib").glob("*/bin/rust-lld"):
        return [str(rust_lld), "-flavor", "link"]
    return None


def missing_toolchain() -> str | None:
    """Why the UEFI images cannot be built here (None when they can)."""
    found = find_uefi_rustc()
    if found is None:
        return ("no rustc with its library sources (Debian: apt-get install rustc-web "
                "rust-web-src)")
    if find_linker(found[0]) is None:
        return "no lld-link (Debian: apt-get install lld)"
    return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fuzzfarm" / "uefi-sysroot"


def _run(cmd: list[str], cwd: Path, what: str, env: dict[str, str]) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=False, env=env)
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"{what} timed out after {BUILD_TIMEOUT_S} s",
                              str(e.stderr or "")) from e
    except OSError as e:
        raise GuestBuildError(f"cannot run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines()
                      if line.startswith(("error", "lld-link: error"))),
                     f"exited with {proc.returncode}")
        raise GuestBuildError(f"{what} failed: {first}", proc.stderr)


def _env() -> dict[str, str]:
    return {**os.environ, "RUSTC_BOOTSTRAP": "1"}


def sysroot(rustc: str, library: Path, progress: Any = print) -> Path:
    """The private sysroot with core, compiler_builtins and alloc for TARGET, built once per
    compiler and library sources."""
    key = hashlib.sha256("\0".join([rustc_version(rustc), str(library), *_LIBRARY_FLAGS,
                                    *_BUILTINS_CFG]).encode()).hexdigest()[:16]
    root = _cache_root() / key
    lib = root / "lib" / "rustlib" / TARGET / "lib"
    done = root / "complete"
    if done.is_file():
        return root
    progress(f"building core, compiler_builtins and alloc for {TARGET} (once per compiler)")
    shutil.rmtree(root, ignore_errors=True)
    lib.mkdir(parents=True)
    remap = f"--remap-path-prefix={library}={LIBRARY_REMAP}"
    crates = [
        ("core", library / "core" / "src" / "lib.rs", []),
        ("compiler_builtins", library / "compiler-builtins" / "compiler-builtins" / "src" /
         "lib.rs", [arg for cfg in _BUILTINS_CFG for arg in ("--cfg", cfg)]),
        ("alloc", library / "alloc" / "src" / "lib.rs", []),
    ]
    for name, source, extra in crates:
        _run([rustc, "--edition", "2024", "--crate-type", "rlib", "--crate-name", name,
              "--target", TARGET, *_LIBRARY_FLAGS, *extra, remap, "--sysroot", str(root),
              "-o", str(lib / f"lib{name}.rlib"), str(source)],
             library, f"building {name} for {TARGET}", _env())
    done.write_text(rustc_version(rustc) + "\n")
    return root


def _same_code(image: Path, debug: Path) -> None:
    """The DWARF companion describes the image only if its code is the image's."""
    import lief

    a, b = lief.PE.parse(str(image)), lief.PE.parse(str(debug))
    if a is None or b is None:
        raise GuestBuildError(f"cannot read {image.name} or its DWARF companion")
    code = {bytes(s.content) for pe in (a, b) for s in pe.sections if s.name == ".text"}
    if len(code) != 1 or a.optional_header.imagebase != b.optional_header.imagebase:
        raise GuestBuildError(f"the DWARF companion of {image.name} has other code than the "
                              "image: its source lines would be wrong")


SHIM = "rxboot"  # the boot shim: bootshim/main.rs, what a boot loader does on a real machine


def _flags(variant: str, out_file: str, map_file: str, guest_dir: str) -> list[str]:
    flags = list(_KERNEL_FLAGS)
    source = "src/main.rs"
    if variant == "fixed":
        flags += ["--cfg", "rustux_fixed"]
    if variant == "upstream":
        flags += ["--cfg", "rustux_upstream"]
    if variant == SHIM:
        flags[flags.index("rustux")] = SHIM
        source = "bootshim/main.rs"
    flags += ["-C", f"link-arg=/MAP:{map_file}", f"--remap-path-prefix={guest_dir}=rustux",
              "-o", out_file, source]
    return flags


def build(variant: str, out_dir: Path, progress: Any = print) -> dict[str, Any]:
    """Builds one variant (or the boot shim, SHIM) into `out_dir/<variant>.efi` (and its
    `.map`); returns its manifest entry."""
    if variant not in (*VARIANTS, SHIM):
        raise GuestBuildError(f"unknown guest variant {variant!r} (expected one of "
                              f"{(*VARIANTS, SHIM)})")
    found = find_uefi_rustc()
    if found is None:
        raise GuestBuildError(missing_toolchain() or "no UEFI toolchain")
    rustc, library = found
    linker = find_linker(rustc)
    if linker is None:
        raise GuestBuildError("no lld-link (Debian: apt-get install lld)")
    root = sysroot(rustc, library, progress)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name, map_name = f"{variant}.efi", f"{variant}.map"
    out, map_path = out_dir / name, out_dir / map_name
    linker_args = ["-C", f"linker={linker[0]}"] + [f"-Clink-arg={a}" for a in linker[1:]]
    _run([rustc, *linker_args, "--sysroot", str(root),
          *_flags(variant, str(out), str(map_path), str(GUEST_DIR))],
         GUEST_DIR, f"building the {variant} UEFI image", _env())
    debug_name = f"{variant}.debug"
    with tempfile.TemporaryDirectory(prefix="fuzzfarm-uefi-debug-") as tmp:
        flags = _flags(variant, f"{tmp}/{name}", f"{tmp}/{map_name}", str(GUEST_DIR))
        flags[flags.index("-C", flags.index("link-arg=/DEBUG:NONE") - 1) + 1] = \
            "link-arg=/DEBUG:DWARF"
        _run([rustc, *linker_args, "--sysroot", str(root), *flags], GUEST_DIR,
             f"linking the {variant} UEFI image's DWARF companion", _env())
        _same_code(out, Path(tmp) / name)
        shutil.copyfile(Path(tmp) / name, out_dir / debug_name)
    data = out.read_bytes()
    return {
        "file": name,
        "map": map_name,
        "map_sha256": hashlib.sha256(map_path.read_bytes()).hexdigest(),
        "debug": debug_name,
        "debug_sha256": hashlib.sha256((out_dir / debug_name).read_bytes()).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rustc": rustc_version(rustc),
        "target": TARGET,
        "flags": _flags(variant, f"{{out_dir}}/{name}", f"{{out_dir}}/{map_name}",
                        "{guest_dir}"),
        "size": len(data),
    }
