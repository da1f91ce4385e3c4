"""Reproducers for the guest kernel's known bugs, derived from a real gcc-built ELF by patching
header and program-header fields. Each names the crash class expected on the seed build."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from kernel_emu.elflayout import ELF64_EHDR, ELF64_PHDR, ELF64_PHDR_SIZE, PT_LOAD

PHDR = ELF64_PHDR_SIZE
HEAP_SIZE = 0x100_0000
HEADER = 40


def _phoff(elf: bytes) -> int:
    return ELF64_EHDR["e_phoff"].read(elf)


def _phnum(elf: bytes) -> int:
    return ELF64_EHDR["e_phnum"].read(elf)


def loads(elf: bytes) -> list[int]:
    """Indexes (in the program-header table) of the PT_LOAD entries."""
    off = _phoff(elf)
    return [i for i in range(_phnum(elf))
            if ELF64_PHDR["p_type"].read(elf, off + i * PHDR) == PT_LOAD]


def set_phdr(elf: bytes, index: int, **fields: int) -> bytes:
    """`elf` with fields of program header `index` set, named without their `p_` prefix."""
    out = bytearray(elf)
    base = _phoff(elf) + index * PHDR
    for name, value in fields.items():
        ELF64_PHDR["p_" + name].write(out, value, base)
    return bytes(out)


def get_phdr(elf: bytes, index: int) -> dict[str, int]:
    base = _phoff(elf) + index * PHDR
    return {f.name.removeprefix("p_"): f.read(elf, base) for f in ELF64_PHDR}


def set_header(elf: bytes, **fields: int) -> bytes:
    """`elf` with ELF header fields set, named without their `e_` prefix."""
    out = bytearray(elf)
    for name, value in fields.items():
        ELF64_EHDR["e_" + name].write(out, value)
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


PT_NOTE = 4
PT_GNU_STACK = 0x6474E551
NT_GNU_BUILD_ID = 3


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    """One ELF note: sizes, type, then name and description each padded to 4 bytes."""
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def build_id(size: int = 20, fill: int = 0xAB) -> bytes:
    return note(b"GNU\0", NT_GNU_BUILD_ID, bytes([fill]) * size)


def with_notes(elf: bytes, blob: bytes) -> bytes:
    """`elf` with its last program header turned into a PT_NOTE over `blob`, appended to the
    file (the last header of a gcc-built example is PT_GNU_STACK, which nothing needs)."""
    last = _phnum(elf) - 1
    out = set_phdr(elf, last, type=PT_NOTE, flags=4, offset=len(elf), vaddr=0, paddr=0,
                   filesz=len(blob), memsz=0, align=4)
    return out + blob


def _stack_rights_after_load(elf: bytes) -> bytes:
    # an executable stack asked for right after the last PT_LOAD (a writable data segment)
    stack = next(i for i in range(_phnum(elf))
                 if get_phdr(elf, i)["type"] == PT_GNU_STACK)
    assert stack == loads(elf)[-1] + 1, "the example's PT_GNU_STACK follows its last PT_LOAD"
    return set_phdr(elf, stack, flags=7)


def _realloc_over_freed_name(elf: bytes) -> bytes:
    # a build ID stays right after the freed copy of its name; three more notes grow the table
    # into that hole
    vendor = b"".join(note(b"RX\0", 1 + i, b"\x01" * 4) for i in range(3))
    return with_notes(elf, build_id() + vendor)


def _shared_page(elf: bytes) -> bytes:
    # the writable segment first, then the read-only one moved into its last page
    rodata, data = loads(elf)[1:3]
    seg = get_phdr(elf, data)
    at = (seg["vaddr"] + seg["memsz"] + 0xFF) & ~0xFF
    moved = set_phdr(elf, rodata, vaddr=at, paddr=at,
                     offset=get_phdr(elf, rodata)["offset"] + (at & 0xFFF))
    # the program header table in the order data, read-only
    base = _phoff(elf)
    table = bytearray(moved)
    a, b = base + rodata * PHDR, base + data * PHDR
    table[a:a + PHDR], table[b:b + PHDR] = moved[b:b + PHDR], moved[a:a + PHDR]
    return bytes(table)


def _long_build_id(elf: bytes) -> bytes:
    return with_notes(elf, build_id(48))


def _two_build_ids(elf: bytes) -> bytes:
    return with_notes(elf, build_id(20, 0xAB) + build_id(20, 0xCD))


def _cached_leaf_table(elf: bytes) -> bytes:
    # the last segment just below 1 GiB: its last level-1 table has the level-2 index (511)
    # of the user stack's
    i = loads(elf)[-1]
    seg = get_phdr(elf, i)
    at = 0x3FE0_0000 + (seg["vaddr"] & 0xFFFF)
    return set_phdr(elf, i, vaddr=at, paddr=at)


def _data_to_end_of_file(elf: bytes) -> bytes:
    # the last segment's file data runs to the end of the file, whose last byte is not zero
    i = loads(elf)[-1]
    seg = get_phdr(elf, i)
    out = set_phdr(elf, i, filesz=len(elf) + 8 - seg["offset"],
                   memsz=max(seg["memsz"], len(elf) + 8 - seg["offset"]))
    return out + b"\x11" * 8


def _truncated_note(elf: bytes) -> bytes:
    return with_notes(elf, build_id() + struct.pack("<III", 0x100, 0, 1))


REPRODUCERS = [
    Reproducer("RX-01", "heap-corruption", split_trigger),
    Reproducer("RX-02", "cpu-fault", _wrap_offset),
    Reproducer("RX-03", "vaddr-corruption", _memsz_truncated),
    Reproducer("RX-04", "kernel-mapping", _upper_half),
    Reproducer("RX-05", "heap-corruption", _filesz_over_memsz),
    Reproducer("RX-06", "unchecked-field", _phentsize_zero),
    Reproducer("RX-07", "kernel-panic", _align_zero),
    Reproducer("RX-08", "bad-entry", _entry_outside),
    Reproducer("RX-09", "out-of-memory", _too_big),
    Reproducer("RX-10", "vaddr-corruption", _stack_rights_after_load),
    Reproducer("RX-11", "heap-corruption", _realloc_over_freed_name),
    Reproducer("RX-12", "vaddr-corruption", _shared_page),
    Reproducer("RX-13", "heap-corruption", _long_build_id),
    Reproducer("RX-14", "memory-leak", _two_build_ids),
    Reproducer("RX-15", "bad-entry", _cached_leaf_table),
    Reproducer("RX-16", "vaddr-corruption", _data_to_end_of_file),
    Reproducer("RX-17", "memory-leak", _truncated_note),
]
