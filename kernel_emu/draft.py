"""`fuzzfarm kernel init IMAGE`: a first profile for a user's kernel build, drafted from the
image's own symbols, and `fuzzfarm boot --check`: is a profile good enough to fuzz with?

A draft names what the symbols tell: the allocator's entry points (a type's or module's
`allocate`/`deallocate` pair, or `alloc`/`dealloc`, `malloc`/`free`), the head of the free list,
the kernel stack, the function that loads the init program (the snapshot point) and the label
of the return to user mode (the success point). What symbols cannot tell (where the heap lies
and how its block header is laid out) is written as a commented guess, and said so. Nothing
here knows any particular kernel: names are matched by shape only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kernel_emu.errors import HarnessError, ImageError
from kernel_emu.image import KernelImage, Symbol
from kernel_emu.result import StopReason

# the toolchain's own code: never the kernel's allocator or loader
_LIBRARY = re.compile(r"^(<|core::|alloc::|std::|compiler_builtins::|__rust_|__rdl_|__rg_|"
                      r"rust_begin_unwind|rust_eh_)")
ALLOCATE = ("allocate", "alloc", "malloc", "kmalloc")
DEALLOCATE = ("deallocate", "dealloc", "free", "kfree")
REALLOCATE = ("reallocate", "realloc", "krealloc", "resize")
# where a UEFI image goes when the profile does not say (the emulated firmware's choice)
DEFAULT_UEFI_LOAD_BASE = 0x10_0000


@dataclass
class Draft:
    text: str  # the profile, TOML
    found: dict[str, str] = field(default_factory=dict)  # profile key -> symbol
    missing: list[str] = field(default_factory=list)  # what to fill in by hand, and how


def _last(name: str) -> str:
    return name.rsplit("::", 1)[-1]


def _owner(name: str) -> str:
    return name.rsplit("::", 1)[0] if "::" in name else ""


def _kernel_symbols(image: KernelImage) -> list[Symbol]:
    return [s for s in image.symbols if not _LIBRARY.match(s.name)]


def _is_code(image: KernelImage, address: int) -> bool:
    return any(lo <= address < hi for lo, hi in image.text_ranges)


def _allocator(code: list[Symbol]) -> tuple[str, str] | None:
    """An allocate/deallocate pair with the same owner (type or module) among the kernel's
    functions."""
    frees = {(_owner(s.name), _last(s.name).lower()): s.name for s in code}
    pairs = []
    for s in code:
        last = _last(s.name).lower()
        if last not in ALLOCATE:
            continue
        for free in DEALLOCATE:
            partner = frees.get((_owner(s.name), free))
            if partner is not None:
                # a heap or allocator module first, then the most specific name
                rank = ("heap" in s.name.lower() or "alloc" in _owner(s.name).lower(),
                        s.name.count("::"))
                pairs.append((rank, s.name, partner))
    if not pairs:
        return None
    pairs.sort(key=lambda p: p[0], reverse=True)
    return pairs[0][1], pairs[0][2]


def _first(symbols: Iterable[Symbol], test: Callable[[str], bool]) -> str | None:
    found = [s.name for s in symbols if test(s.name)]
    return min(found, key=len) if found else None


def draft_profile(path: Path, name: str | None = None) -> Draft:
    """A draft profile for the kernel image at `path` (an ELF, or a UEFI application with its
    link map beside it)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read kernel image {path}: {e.strerror}") from None
    uefi = raw[:2] == b"MZ"
    image = KernelImage(path, DEFAULT_UEFI_LOAD_BASE if uefi else None)
    symbols = _kernel_symbols(image)
    if not symbols:
        raise ImageError(f"{path.name}: no symbols of its own to draft a profile from (a "
                         "stripped image? a UEFI image needs its link map beside it)")
    draft = Draft("")
    data = [s for s in symbols if not _is_code(image, s.address)]
    code = [s for s in symbols if _is_code(image, s.address)]

    pair = _allocator(code)
    if pair is not None:
        draft.found["heap.alloc_symbol"], draft.found["heap.dealloc_symbol"] = pair
        # a resize of the allocator's own, beside them (else resizes go through the two)
        owner = _owner(pair[0])
        resize = [s.name for s in code if _owner(s.name) == owner
                  and _last(s.name).lower() in REALLOCATE]
        if resize:
            draft.found["heap.realloc_symbol"] = min(resize, key=len)
    else:
        draft.missing.append("heap.alloc_symbol, heap.dealloc_symbol: no allocate/deallocate "
                             "pair of one type or module")
    guesses: list[tuple[str, list[Symbol], Callable[[str], bool], str]] = [
        ("heap.free_list_symbol", data,
         lambda n: re.sub(r"[^a-z]", "", _last(n).lower()) in ("freelist", "freehead",
                                                                 "freelisthead"),
         "the static holding the first free block"),
        ("kernel.stack_base_symbol", data,
         lambda n: "stack" in _last(n).lower() and ("kernel" in n.lower()
                                                    or "kstack" in _last(n).lower()),
         "the static holding the kernel stack's lowest address"),
        ("kernel.snapshot_symbol", code,
         lambda n: "init" in _last(n).lower() and "load" in _last(n).lower(),
         "a function entered before the init program is read"),
        ("kernel.success_symbol", code,
         lambda n: re.search(r"iretq|sysret", n.lower()) is not None,
         "the label of the iretq (or sysret) into ring 3"),
    ]
    for key, pool, test, what in guesses:
        found = _first(pool, test)
        if found is None:
            draft.missing.append(f"{key}: {what}")
        else:
            draft.found[key] = found
    draft.missing.append("heap.base, heap.size, heap.header_size, heap.magic and the header's "
                         "field offsets: the symbols do not say; fill them in from the "
                         "allocator's source")
    draft.text = _render(path, name or path.stem, uefi, draft)
    return draft


def _render(path: Path, name: str, uefi: bool, draft: Draft) -> str:
    def value(key: str) -> str:
        found = draft.found.get(key)
        return f'"{found}"' if found else '""  # NOT FOUND: fill in'

    kernel_extra = (f"# where the emulated firmware loads the image (it is relocated there)\n"
                    f"load_base = {DEFAULT_UEFI_LOAD_BASE:#x}\n") if uefi else ""
    convention = "win64" if uefi else "sysv64"
    realloc = (f'realloc_symbol = {value("heap.realloc_symbol")}\n'
               "# GUESS: a build may drop a &self the function never reads; then false\n"
               "realloc_takes_self = true\n") if "heap.realloc_symbol" in draft.found else \
        "# no resize of its own found: resizes are an allocate, a copy and a deallocate\n"
    return f'''# Draft profile for {path.name}, made by `fuzzfarm kernel init` from its symbols.
# Check every value marked GUESS or NOT FOUND, then: fuzzfarm boot --kernel THIS.toml --check
name = "{name}"
image = "{path.name}"
description = "{name} (drafted profile)"

[memory]
ram_size = 0x8000000
ramdisk_base = 0x100000000
ramdisk_size = 0x1000000
firmware_stack_size = 0x2000

[heap]
# how the allocator's entry points take their arguments: "win64" for a Rust function on the
# UEFI target, "sysv64" elsewhere
convention = "{convention}"
base = 0x0  # NOT FOUND: where the heap starts
size = 0x0  # NOT FOUND: its size in bytes
# the block header: its size and where each field lies in it (bytes from its start)
header_size = 0  # NOT FOUND
magic = 0x0  # NOT FOUND: the header's magic value, 0 if it has none
size_offset = 0  # GUESS
free_offset = 8  # GUESS
magic_offset = 16  # GUESS
prev_offset = 24  # GUESS
next_offset = 32  # GUESS
size_includes_header = false  # GUESS: does a header's size count the header itself?
blocks_tile = true  # GUESS: do blocks lie back to back from the base, each size to the next?
list_order = "any"  # GUESS: "address" if the free list is kept by address, "lifo", "any"
free_list_symbol = {value("heap.free_list_symbol")}
alloc_symbol = {value("heap.alloc_symbol")}
dealloc_symbol = {value("heap.dealloc_symbol")}
{realloc}
[kernel]
{kernel_extra}stack_base_symbol = {value("kernel.stack_base_symbol")}
stack_size = 0x10000  # GUESS: the kernel stack's size
snapshot_symbol = {value("kernel.snapshot_symbol")}
success_symbol = {value("kernel.success_symbol")}
user_top = 0x800000000000

[run]
budget = 60000000

# If the kernel embeds its init program instead of reading a ramdisk, say where:
# [input]
# channel = "embedded"
# symbol = "..."        # the blob: a 64-bit size at size_offset, the bytes at data_offset
# size_offset = 0
# data_offset = 8
# capacity = 0x100000
# Values your loader checks against, for the fuzzer (it also learns them from your code):
# [fuzz]
# values = []
'''


# --check ----------------------------------------------------------------------------------

@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


def check_profile(profile_spec: str, example: bytes) -> list[Check]:
    """Is the profile good enough to fuzz with: its symbols resolve, a valid input boots to the
    snapshot point and on to the success point, the allocator is called where the profile says
    and the heap's first header reads as the profile describes it."""
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    checks: list[Check] = []
    try:
        profile = load_profile(profile_spec)
        checks.append(Check("the profile reads", True, str(profile.source)))
        executor = Executor(profile)
    except HarnessError as e:
        checks.append(Check("the profile's symbols resolve and the kernel boots to its "
                            "snapshot point", False, str(e)))
        return checks
    checks.append(Check("the profile's symbols resolve", True))
    snapshot = executor.snapshot is not None
    checks.append(Check("the kernel reaches the snapshot point before reading its input",
                        snapshot, "" if snapshot else "; ".join(executor.notes)))
    try:
        result = executor.run(example)
    except HarnessError as e:
        checks.append(Check("a valid input boots", False, str(e)))
        return checks
    reached = result.stop == StopReason.UNTIL
    checks.append(Check("a valid input reaches the success point (ring 3)", reached,
                        f"stopped by {result.stop} at {result.symbol}"))
    heap = profile.heap
    if heap.size == 0 or heap.header_size == 0:
        checks.append(Check("the heap is described", False,
                            "heap.base, heap.size, heap.header_size and heap.magic must be "
                            "filled in"))
        return checks
    evidence = result.findings[0].evidence[0] if result.findings and \
        result.findings[0].evidence else ""
    checks.append(Check("the oracles find nothing wrong with a valid input",
                        result.verdict == "ok",
                        f"verdict {result.verdict}" + (f": {evidence}" if evidence else "")))
    if heap.blocks_tile:
        used = [b for b in result.heap_blocks if not b.get("free")]
        checks.append(Check("the heap walks as the profile describes it, blocks in use",
                            bool(used), f"{len(result.heap_blocks)} blocks, {len(used)} in use"))
    else:
        bad = [f for f in result.findings if f.field in ("free_list", "block.magic")]
        checks.append(Check("the free list walks as the profile describes it", not bad,
                            bad[0].evidence[0] if bad else
                            f"{len(result.heap_blocks)} free blocks"))
    header = executor.machine.read(heap.base, max(heap.header_size, heap.magic_offset + 8))
    magic = int.from_bytes(header[heap.magic_offset:heap.magic_offset + 8], "little")
    checks.append(Check("the heap's first block header carries the profile's magic",
                        heap.magic == 0 or magic == heap.magic,
                        f"read {magic:#x} at {heap.base + heap.magic_offset:#x}, the profile "
                        f"says {heap.magic:#x}"))
    return checks
