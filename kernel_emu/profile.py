"""Target profiles: what the emulator must know about one kernel build, read from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from kernel_emu.errors import ProfileError
from kernel_emu.result import CrashClass

PROFILE_DIR = Path(__file__).parent / "profiles"
BUILTIN_PROFILES = ("seed", "fixed", "upstream")
# the same builds as static ELFs at their link addresses, the emulator's first way of booting
# the guest: kept to compare with
ELF_PROFILES = ("seed-elf", "fixed-elf", "upstream-elf")
CONVENTIONS = ("sysv64", "win64")
LIST_ORDERS = ("address", "lifo", "any")
# how the kernel gets bin/init: a ramdisk the firmware hands over in its configuration table,
# or a program embedded in the kernel image when it was built
CHANNELS = ("firmware-ramdisk", "embedded")
# the keys of any table that take one of a few words
_CHOICES = {"convention": CONVENTIONS, "list_order": LIST_ORDERS, "channel": CHANNELS}


@dataclass(frozen=True)
class MemoryLayout:
    ram_size: int
    ramdisk_base: int
    ramdisk_size: int
    firmware_stack_size: int


@dataclass(frozen=True)
class HeapLayout:
    base: int
    size: int
    header_size: int
    magic: int
    size_offset: int
    free_offset: int
    magic_offset: int
    prev_offset: int
    next_offset: int
    free_list_symbol: str
    alloc_symbol: str
    dealloc_symbol: str
    # the allocator's resize in place, if it has one of its own (else "": a resize is an
    # allocate, a copy and a deallocate, which the other two already show)
    realloc_symbol: str = ""
    # whether it still takes &self (a compiler may drop an argument the function never
    # reads): then (ptr, new_size) follow it, else they are the first two arguments
    realloc_takes_self: bool = True
    # how the allocator's entry points take their arguments: "sysv64" (rdi, rsi, rdx) or
    # "win64" (rcx, rdx, r8: a Rust function's own convention on the UEFI target)
    convention: str = "sysv64"
    # whether a header's size counts the header itself (else only the payload after it)
    size_includes_header: bool = False
    # whether the blocks lie back to back from the heap base, each header's size leading to
    # the next (false for allocators that leave a block's size claiming more than it holds:
    # then only the free list is walked)
    blocks_tile: bool = True
    # how the free list is kept: "address" (by address, lowest first: a node out of order is
    # damage), "lifo" (the last freed first) or "any"
    list_order: str = "any"

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class KernelLayout:
    stack_base_symbol: str
    stack_size: int
    snapshot_symbol: str
    success_symbol: str
    user_top: int
    # where the firmware loads a UEFI (PE32+) image; None: its preferred ImageBase (an ELF
    # image always lies at its link addresses)
    load_base: int | None = None


@dataclass(frozen=True)
class InputLayout:
    """Optional `[input]` table: where the input goes. `embedded`: a blob in the image's data
    at `symbol`, a little-endian 64-bit size at `size_offset` and up to `capacity` bytes at
    `data_offset`, which the farm overwrites before the kernel reads it."""

    channel: str = "firmware-ramdisk"
    symbol: str = ""
    size_offset: int = 0
    data_offset: int = 8
    capacity: int = 0


@dataclass(frozen=True)
class CanaryLayout:
    """Optional `[canaries]` table of a build with planted bugs: a byte per bug at `symbol`,
    bit 0 set when the bug's code is reached, bit 1 when the bug is triggered, in the order
    of `names`. `classes`: the crash class each bug is expected to show (BUGS.md), which a
    benchmark uses to tell which of several bugs an input triggered a bucket is. For
    benchmarks only: no oracle reads them."""

    symbol: str = ""
    names: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunLimits:
    budget: int


@dataclass(frozen=True)
class FuzzHints:
    """Optional `[fuzz]` table: values the kernel's author knows its loader checks against
    (limits, magic numbers, addresses), tried by the mutator beside those it learns from the
    image."""

    values: tuple[int, ...] = ()


@dataclass(frozen=True)
class TargetProfile:
    name: str
    image: Path
    description: str
    memory: MemoryLayout
    heap: HeapLayout
    kernel: KernelLayout
    run: RunLimits
    source: Path
    fuzz: FuzzHints = FuzzHints()
    input: InputLayout = InputLayout()
    canaries: CanaryLayout = CanaryLayout()


def _section(raw: dict[str, Any], key: str, cls: type, origin: Path) -> Any:
    table = raw.get(key)
    if not isinstance(table, dict):
        raise ProfileError(f"{origin}: missing [{key}] table")
    wanted = {f.name: f.type for f in fields(cls)}
    optional = {f.name for f in fields(cls) if f.default is not MISSING}
    missing = sorted(set(wanted) - set(table) - optional)
    if missing:
        raise ProfileError(f"{origin}: [{key}] lacks {', '.join(missing)}")
    values = {}
    for name, typ in wanted.items():
        if name not in table:
            continue  # optional, left at its default
        value = table[name]
        expect = {"str": str, "bool": bool}.get(typ if isinstance(typ, str) else typ.__name__, int)
        if not isinstance(value, expect) or (expect is int and isinstance(value, bool)):
            raise ProfileError(f"{origin}: [{key}].{name} must be {expect.__name__}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ProfileError(f"{origin}: [{key}].{name} must be one of "
                               f"{', '.join(_CHOICES[name])}")
        values[name] = value
    return cls(**values)


def _fuzz_hints(raw: dict[str, Any], origin: Path) -> FuzzHints:
    table = raw.get("fuzz", {})
    if not isinstance(table, dict):
        raise ProfileError(f"{origin}: [fuzz] must be a table")
    unknown = sorted(set(table) - {"values"})
    if unknown:
        raise ProfileError(f"{origin}: [fuzz] has unknown keys {', '.join(unknown)}")
    values = table.get("values", [])
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
            for v in values):
        raise ProfileError(f"{origin}: [fuzz].values must be a list of integers from 0 to "
                           "2**64 - 1")
    return FuzzHints(tuple(values))


def _input_layout(raw: dict[str, Any], origin: Path) -> InputLayout:
    if "input" not in raw:
        return InputLayout()
    layout: InputLayout = _section(raw, "input", InputLayout, origin)
    if layout.channel == "embedded" and (not layout.symbol or layout.capacity <= 0):
        raise ProfileError(f"{origin}: an embedded input needs [input].symbol and a "
                           "capacity above 0")
    return layout


def _canaries(raw: dict[str, Any], origin: Path) -> CanaryLayout:
    table = raw.get("canaries")
    if table is None:
        return CanaryLayout()
    symbol, names = (table.get("symbol"), table.get("names")) if isinstance(table, dict) \
        else (None, None)
    if not isinstance(symbol, str) or not symbol or not isinstance(names, list) or \
            not names or not all(isinstance(n, str) and n for n in names) or \
            len(set(names)) != len(names):
        raise ProfileError(f"{origin}: [canaries] needs a symbol and a list of distinct names")
    classes = table.get("classes", [])
    known = {c.value for c in CrashClass}
    if not isinstance(classes, list) or (classes and len(classes) != len(names)) or \
            not all(c in known for c in classes):
        raise ProfileError(f"{origin}: [canaries] classes must name a crash class per bug "
                           f"({', '.join(sorted(known))})")
    return CanaryLayout(symbol, tuple(names), tuple(classes))


def load_profile_file(path: Path) -> TargetProfile:
    """Read a profile TOML; the image path is relative to the profile file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    for key in ("name", "image"):
        if not isinstance(raw.get(key), str):
            raise ProfileError(f"{path}: missing string field '{key}'")
    image = (path.parent / raw["image"]).resolve()
    if not image.is_file():
        raise ProfileError(f"{path}: kernel image {raw['image']} not found")
    return TargetProfile(
        name=raw["name"],
        image=image,
        description=str(raw.get("description", "")),
        memory=_section(raw, "memory", MemoryLayout, path),
        heap=_section(raw, "heap", HeapLayout, path),
        kernel=_section(raw, "kernel", KernelLayout, path),
        run=_section(raw, "run", RunLimits, path),
        source=path.resolve(),
        fuzz=_fuzz_hints(raw, path),
        input=_input_layout(raw, path),
        canaries=_canaries(raw, path),
    )


def load_profile(spec: str) -> TargetProfile:
    """A built-in profile name (BUILTIN_PROFILES, ELF_PROFILES) or a path to a profile
    TOML."""
    if spec in BUILTIN_PROFILES + ELF_PROFILES:
        return load_profile_file(PROFILE_DIR / f"{spec}.toml")
    path = Path(spec)
    if path.suffix != ".toml" and not path.exists():
        raise ProfileError(
            f"unknown kernel '{spec}': use one of "
            f"{', '.join(BUILTIN_PROFILES + ELF_PROFILES)} or a profile .toml"
        )
    return load_profile_file(path)
