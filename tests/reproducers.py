"""Reproducers for the guest kernel's known bugs, derived from a real gcc-built ELF by patching
header and program-header fields. Each names the crash class expected on the seed build."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

PHDR = 56
HEAP_SIZE = 0x100_0000
HEADER = 40
PT_LOAD = 1


def _phoff(elf: bytes) -> int:
    return struct.unpack_from("<Q", elf, 0x20)[0]


def _phnum(elf: bytes) -> int:
    return struct.unpack_from("<H", elf, 0x38)[0]


def loads(elf: bytes) -> list[int]:
    """Indexes (in the program-header table) of the PT_LOAD entries."""
    off = _phoff(elf)
    return [i for i in range(_phnum(elf))
            if struct.unpack_from("<I", elf, off + i * PHDR)[0] == PT_LOAD]


def set_phdr(elf: bytes, index: int, **fields: int) -> bytes:
    layout = {"type": (0, "<I"), "flags": (4, "<I"), "offset": (8, "<Q"), "vaddr": (16, "<Q"),
              "paddr": (24, "<Q"), "filesz": (32, "<Q"), "memsz": (40, "<Q"), "align": (48, "<Q")}
    out = bytearray(elf)
    base = _phoff(elf) + index * PHDR
    for name, value in fields.items():
        off, fmt = layout[name]
        struct.pack_into(fmt, out, base + off, value)
    return bytes(out)


def get_phdr(elf: bytes, index: int) -> dict[str, int]:
    base = _phoff(elf) + index * PHDR
    t, f, off, va, pa, fs, ms, al = struct.unpack_from("<IIQQQQQQ", elf, base)
    return {"type": t, "flags": f, "offset": off, "vaddr": va, "paddr": pa, "filesz": fs,
            "memsz": ms, "align": al}


def set_header(elf: bytes, **fields: int) -> bytes:
    layout = {"entry": (0x18, "<Q"), "phoff": (0x20, "<Q"), "phentsize": (0x36, "<H"),
              "phnum": (0x38, "<H")}
    out = bytearray(elf)
    for name, value in fields.items():
        off, fmt = layout[name]
        struct.pack_into(fmt, out, off, value)
    return bytes(out)


def _round8(n: int) -> int:
    return (n + 7) & ~7


def split_trigger(elf: bytes, leftover: int = 80) -> bytes:
    """Grow the last PT_LOAD's memsz so that, after the loader's allocations (the segments
    Vec sized for every program header, then one buffer per segment), the free block left over
    is `leftover` bytes: under the seed allocator's 160-byte split threshold.

    The loader allocates the segment table (40 bytes per program header on seed), a table of
    buffer pointers (8 bytes per PT_LOAD), then one buffer per PT_LOAD."""
    idx = loads(elf)
    free = HEAP_SIZE - HEADER
    free -= _round8(PHDR_SEGMENT * _phnum(elf)) + HEADER
    free -= _round8(8 * len(idx)) + HEADER
    for i in idx[:-1]:
        free -= _round8(get_phdr(elf, i)["memsz"]) + HEADER
    return set_phdr(elf, idx[-1], memsz=free - leftover)


PHDR_SEGMENT = 40  # bytes per entry of the kernel's segment table


@dataclass(frozen=True)
class Reproducer:
    bug: str
    expected: str  # crash class on seed
    make: Callable[[bytes], bytes]


def _wrap_offset(elf: bytes) -> bytes:
    i = loads(elf)[-1]
    return set_phdr(elf, i, offset=(1 << 64) - 0x1000, filesz=0x2000,
                    memsz=max(0x2000, get_phdr(elf, i)["memsz"]))


def _memsz_truncated(elf: bytes) -> bytes:
    i = loads(elf)[-1]
    return set_phdr(elf, i, memsz=(1 << 32) + get_phdr(elf, i)["memsz"])


def _upper_half(elf: bytes) -> bytes:
    i = loads(elf)[-1]
    seg = get_phdr(elf, i)
    return set_phdr(elf, i, vaddr=0xFFFF_8000_0040_0000 + (seg["vaddr"] & 0xFFF))


def _filesz_over_memsz(elf: bytes) -> bytes:
    i = loads(elf)[0]
    seg = get_phdr(elf, i)
    return set_phdr(elf, i, memsz=max(8, seg["filesz"] // 4))


def _phentsize_zero(elf: bytes) -> bytes:
    return set_header(elf, phentsize=0)


def _align_zero(elf: bytes) -> bytes:
    return set_phdr(elf, loads(elf)[0], align=0)


def _entry_outside(elf: bytes) -> bytes:
    # the writable data segment: mapped, user-accessible, not executable
    i = loads(elf)[-1]
    return set_header(elf, entry=get_phdr(elf, i)["vaddr"])


def _too_big(elf: bytes) -> bytes:
    return set_phdr(elf, loads(elf)[-1], memsz=0x200_0000)


REPRODUCERS = [
    Reproducer("RX-01", "heap-corruption", split_trigger),
    Reproducer("RX-02", "cpu-fault", _wrap_offset),
    Reproducer("RX-03", "vaddr-corruption", _memsz_truncated),
    Reproducer("RX-04", "kernel-mapping", _upper_half),
    Reproducer("RX-05", "heap-corruption", _filesz_over_memsz),
    Reproducer("RX-06", "hang", _phentsize_zero),
    Reproducer("RX-07", "kernel-panic", _align_zero),
    Reproducer("RX-08", "bad-entry", _entry_outside),
    Reproducer("RX-09", "out-of-memory", _too_big),
]
