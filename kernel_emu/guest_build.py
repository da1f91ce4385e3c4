"""Builds the Rustux guest kernel images (seed and fixed) with the host's stable rustc.

The kernel is a single `rustc` invocation on `guest/src/main.rs`: no cargo, no crates beyond
core and alloc, linked through `guest/linker.ld` into a static non-PIE ELF. The two variants
differ only by `--cfg rustux_fixed`. Builds are byte-for-byte reproducible: no build id, and
the source directory (which also ends up in DWARF as the compilation directory) is remapped
to `rustux`.

Manifest `flags` are the exact rustc arguments with two placeholders for the only
machine-specific parts: `{guest_dir}` (absolute path of `kernel_emu/guest`, the working
directory of the build) and `{out_dir}` (the output directory).

The compiler is `$RUSTC` when set, else `rustc` on PATH, else rustup's own copy in
`$CARGO_HOME/bin` (`~/.cargo/bin`): rustup puts that folder on PATH from the login shell's
profile only, so CI jobs and other non-interactive shells often lack it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

GUEST_DIR = Path(__file__).resolve().parent / "guest"
VARIANTS = ("seed", "fixed", "upstream")
BUILD_TIMEOUT_S = 600

_BASE_FLAGS = [
    "--edition", "2021",
    "--crate-type", "bin",
    "--crate-name", "rustux",
    "-C", "panic=abort",
    "-C", "opt-level=2",
    "-C", "relocation-model=static",
    "-C", "codegen-units=1",
    "-C", "debuginfo=1",
    "-C", "force-frame-pointers=yes",
    "-C", "link-arg=-nostartfiles",
    "-C", "link-arg=-nostdlib",
    "-C", "link-arg=-static",
    "-C", "link-arg=-no-pie",
    "-C", "link-arg=-Wl,--build-id=none",
    "-C", "link-arg=-Tlinker.ld",
    "--check-cfg", "cfg(rustux_fixed, rustux_upstream)",
]


class GuestBuildError(Exception):
    """The guest kernel could not be built; `stderr` holds the compiler's output."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def rustc_candidates() -> list[str]:
    """Every rustc this module would use, in order of preference (see the module doc)."""
    chosen = os.environ.get("RUSTC")
    if chosen:
        found = shutil.which(chosen)
        return [found] if found else []
    candidates: list[str] = []
    on_path = shutil.which("rustc")
    if on_path is not None:
        candidates.append(on_path)
    cargo_home = Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo")
    rustup = shutil.which("rustc", path=str(cargo_home / "bin"))
    if rustup is not None and all(not Path(rustup).samefile(c) for c in candidates):
        candidates.append(rustup)
    return candidates


def find_rustc(version: str | None = None) -> str | None:
    """The first candidate rustc, or the first whose `rustc_version` is `version`."""
    for rustc in rustc_candidates():
        if version is None:
            return rustc
        try:
            if rustc_version(rustc) == version:
                return rustc
        except GuestBuildError:
            continue
    return None


def _rustc() -> str:
    rustc = find_rustc()
    if rustc is None:
        raise GuestBuildError("rustc not found ($RUSTC, PATH, ~/.cargo/bin)")
    return rustc


def rustc_version(rustc: str | None = None) -> str:
    """`rustc -vV`'s version line plus its release and commit-hash fields."""
    try:
        proc = subprocess.run([rustc or _rustc(), "-vV"], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise GuestBuildError(f"cannot run rustc -vV: {e}") from e
    if proc.returncode != 0:
        raise GuestBuildError(f"rustc -vV exited with {proc.returncode}", proc.stderr)
    lines = proc.stdout.splitlines()
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    release, commit = fields.get("release"), fields.get("commit-hash")
    if not lines or release is None or commit is None:
        raise GuestBuildError("unexpected rustc -vV output", proc.stdout)
    return f"{lines[0]}; release: {release}; commit-hash: {commit}"


def _flags(variant: str, out_file: str, guest_dir: str) -> list[str]:
    flags = list(_BASE_FLAGS)
    if variant == "fixed":
        flags += ["--cfg", "rustux_fixed"]
    if variant == "upstream":
        flags += ["--cfg", "rustux_upstream"]
    flags += [f"--remap-path-prefix={guest_dir}=rustux", "-o", out_file, "src/main.rs"]
    return flags


def build(variant: str, out_dir: Path, rustc: str | None = None) -> dict[str, Any]:
    """Builds one variant into `out_dir/<variant>.elf` and returns its manifest entry."""
    if variant not in VARIANTS:
        raise GuestBuildError(f"unknown guest variant {variant!r} (expected one of {VARIANTS})")
    rustc = rustc or _rustc()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{variant}.elf"
    out = out_dir / name
    args = _flags(variant, str(out), str(GUEST_DIR))
    try:
        proc = subprocess.run([rustc, *args], cwd=GUEST_DIR, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"rustc timed out after {BUILD_TIMEOUT_S} s building {variant}",
                              str(e.stderr or "")) from e
    except OSError as e:
        raise GuestBuildError(f"cannot run rustc: {e}") from e
    if proc.returncode != 0 or not out.is_file():
        first = next((line for line in proc.stderr.splitlines() if line.startswith("error")),
                     f"rustc exited with {proc.returncode}")
        raise GuestBuildError(f"building the {variant} guest failed: {first}", proc.stderr)
    data = out.read_bytes()
    return {
        "file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "rustc": rustc_version(rustc),
        "flags": _flags(variant, f"{{out_dir}}/{name}", "{guest_dir}"),
        "size": len(data),
    }


def build_all(out_dir: Path, rustc: str | None = None,
              more: dict[str, Callable[[Path], dict[str, Any]]] | None = None
              ) -> dict[str, Any]:
    """Builds every variant as a static ELF (manifest entry `<variant>-elf`, as its profile is
    named), and the `more` images (name -> a builder into a directory), and writes
    `out_dir/manifest.json`; returns the manifest."""
    out_dir = Path(out_dir)
    rustc = rustc or _rustc()
    manifest = {f"{variant}-elf": build(variant, out_dir, rustc) for variant in VARIANTS}
    for name, builder in (more or {}).items():
        manifest[name] = builder(out_dir)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
