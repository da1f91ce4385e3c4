"""A reader of what an ELF file *says*, safe on hostile input.

The farm compares the segments the guest kernel reports having loaded with what the ELF's
program headers claim.  The bytes come straight from the fuzzer, so nothing here may raise:
every read is bounds-checked, sizes are treated as untrusted, and anything odd is recorded as
a human-readable problem instead.

Only ELF64 little-endian files get their program headers read, because that is the only
layout the kernel's loader accepts; the header of other classes is still decoded as far as
its own layout allows, so a report can say what the file claims to be.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from kernel_emu.elflayout import (
    EI_CLASS,
    EI_DATA,
    EI_VERSION,
    ELF32_EHDR,
    ELF32_EHDR_SIZE,
    ELF64_EHDR,
    ELF64_EHDR_SIZE,
    ELF64_PHDR,
    ELF64_PHDR_SIZE,
    ELF_MAGIC,
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_RISCV,
    EM_X86_64,
    ET_CORE,
    ET_DYN,
    ET_EXEC,
    ET_REL,
    EV_CURRENT,
    PF_R,
    PF_W,
    PF_X,
    PN_XNUM,
    PT_DYNAMIC,
    PT_GNU_EH_FRAME,
    PT_GNU_PROPERTY,
    PT_GNU_RELRO,
    PT_GNU_STACK,
    PT_INTERP,
    PT_LOAD,
    PT_NOTE,
    PT_NULL,
    PT_PHDR,
    PT_SHLIB,
    PT_TLS,
    Record,
)

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the same reading in Python
    native_walker = None  # type: ignore[assignment]

# the layout constants stay importable from here, where the farm's readers found them first
__all__ = [
    "ELF32_EHDR_SIZE", "ELF64_EHDR_SIZE", "ELF64_PHDR_SIZE", "ELF_MAGIC", "ELFCLASS32",
    "ELFCLASS64", "ELFDATA2LSB", "ELFDATA2MSB", "EM_X86_64", "ET_EXEC", "EV_CURRENT",
    "MAX_PROBLEMS", "MAX_PROGRAM_HEADERS", "PF_R", "PF_W", "PF_X", "PN_XNUM", "PT_LOAD",
    "ElfView", "ProgramHeader", "Segment", "describe_header", "load_segments", "read_elf",
]

# e_phnum is 16 bits, so this also bounds the work a single file can cause.
MAX_PROGRAM_HEADERS = 65535
# A mutated file can have thousands of bad headers; past this the list stops being useful.
MAX_PROBLEMS = 64

_U64 = 1 << 64

# load_segments runs for every fuzzed input: its structs and offsets are bound here once
_PHDR64 = ELF64_PHDR.le
_PHOFF64 = ELF64_EHDR["e_phoff"].le
_PHOFF64_AT = ELF64_EHDR["e_phoff"].offset
# e_phentsize and e_phnum are neighbours, read with one unpack
_PHENTSIZE_PHNUM = struct.Struct("<" + ELF64_EHDR["e_phentsize"].code
                                 + ELF64_EHDR["e_phnum"].code)
_PHENTSIZE_PHNUM_AT = ELF64_EHDR["e_phentsize"].offset
assert ELF64_EHDR["e_phnum"].offset == _PHENTSIZE_PHNUM_AT + ELF64_EHDR["e_phentsize"].size

_CLASS_NAMES = {0: "NONE", ELFCLASS32: "ELF32", ELFCLASS64: "ELF64"}
_DATA_NAMES = {0: "NONE", ELFDATA2LSB: "little-endian", ELFDATA2MSB: "big-endian"}
_TYPE_NAMES = {0: "NONE", ET_REL: "REL", ET_EXEC: "EXEC", ET_DYN: "DYN", ET_CORE: "CORE"}
_MACHINE_NAMES = {0: "none", EM_386: "x86", EM_ARM: "ARM", EM_X86_64: "x86-64",
                  EM_AARCH64: "AArch64", EM_RISCV: "RISC-V"}
_PT_NAMES = {PT_NULL: "NULL", PT_LOAD: "LOAD", PT_DYNAMIC: "DYNAMIC", PT_INTERP: "INTERP",
             PT_NOTE: "NOTE", PT_SHLIB: "SHLIB", PT_PHDR: "PHDR", PT_TLS: "TLS",
             PT_GNU_EH_FRAME: "GNU_EH_FRAME", PT_GNU_STACK: "GNU_STACK",
             PT_GNU_RELRO: "GNU_RELRO", PT_GNU_PROPERTY: "GNU_PROPERTY"}


# NamedTuples: built for every input, several times cheaper than frozen dataclasses
class ProgramHeader(NamedTuple):
    """One Elf64_Phdr exactly as stored (raw 64-bit values, nothing validated)."""

    index: int  # type: ignore[assignment]  # a field (its place in the table), not tuple.index
    p_type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def type_name(self) -> str:
        return _PT_NAMES.get(self.p_type, f"0x{self.p_type:x}")


class Segment(NamedTuple):
    """A PT_LOAD entry reduced to the five fields the kernel logs for each loaded segment."""

    vaddr: int
    memsz: int
    filesz: int
    offset: int
    flags: int

    def to_json(self) -> dict[str, int]:
        return {
            "vaddr": self.vaddr,
            "memsz": self.memsz,
            "filesz": self.filesz,
            "offset": self.offset,
            "flags": self.flags,
        }


@dataclass(frozen=True)
class ElfView:
    """What an ELF header and its program header table claim; fields are 0 when unreadable."""

    is_elf: bool
    elf_class: int
    data: int
    machine: int
    e_type: int
    entry: int
    phoff: int
    phentsize: int
    phnum: int
    shoff: int
    shnum: int
    program_headers: tuple[ProgramHeader, ...]
    problems: tuple[str, ...]

    @property
    def load_segments(self) -> tuple[Segment, ...]:
        return tuple(
            Segment(
                vaddr=ph.vaddr, memsz=ph.memsz, filesz=ph.filesz, offset=ph.offset,
                flags=ph.flags,
            )
            for ph in self.program_headers
            if ph.p_type == PT_LOAD
        )

    @property
    def phdr_stride(self) -> int:
        """Bytes from one program header to the next as this reader (and the kernel's loader)
        walks the table: e_phentsize, or an Elf64_Phdr's size when that is larger."""
        return max(self.phentsize, ELF64_PHDR_SIZE)

    def phdr_offset(self, index: int) -> int:
        """Where program header `index` starts in the file."""
        return self.phoff + index * self.phdr_stride

    @property
    def is_loadable_candidate(self) -> bool:
        """True for a 64-bit LE x86-64 executable whose whole phdr table lies in the file."""
        return (
            self.is_elf
            and self.elf_class == ELFCLASS64
            and self.data == ELFDATA2LSB
            and self.machine == EM_X86_64
            and self.e_type == ET_EXEC
            and self.phnum > 0
            and len(self.program_headers) == self.phnum
        )


class _Problems:
    """Collects problems, keeping the list short however broken the file is."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, text: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(text)
        else:
            self.dropped += 1

    def freeze(self) -> tuple[str, ...]:
        if self.dropped:
            return (*self.items, f"... and {self.dropped} more problems not listed")
        return tuple(self.items)


# the ELF header fields read_elf decodes, in this order, for either class and byte order
_HEADER_FIELDS = ("e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff",
                  "e_ehsize", "e_phentsize", "e_phnum", "e_shnum")


def _field_readers(record: Record, byte_order: str) -> tuple[tuple[int, int, struct.Struct], ...]:
    """(offset, end, struct) of each of _HEADER_FIELDS in `record`."""
    return tuple((f.offset, f.offset + f.size, struct.Struct(byte_order + f.code))
                 for f in (record[name] for name in _HEADER_FIELDS))


_HEADER_READERS = {(is64, bo): _field_readers(ELF64_EHDR if is64 else ELF32_EHDR, bo)
                   for is64 in (True, False) for bo in ("<", ">")}


def _read_header(data: bytes, is64: bool, byte_order: str) -> list[int]:
    """_HEADER_FIELDS of the ELF header, each 0 when it does not fit in the data."""
    size = len(data)
    return [reader.unpack_from(data, offset)[0] if end <= size else 0
            for offset, end, reader in _HEADER_READERS[is64, byte_order]]


def _empty_view(problems: _Problems) -> ElfView:
    return ElfView(
        is_elf=False, elf_class=0, data=0, machine=0, e_type=0, entry=0, phoff=0,
        phentsize=0, phnum=0, shoff=0, shnum=0, program_headers=(),
        problems=problems.freeze(),
    )


def read_elf(data: bytes) -> ElfView:
    """Decode the ELF header and program headers of `data` without ever raising."""
    problems = _Problems()
    # bytes(int) would allocate that many zero bytes, so only byte-like objects are converted.
    if not isinstance(data, (bytes, bytearray, memoryview)):
        problems.add("input is not a byte string")
        return _empty_view(problems)
    data = bytes(data)
    size = len(data)

    if data[:4] != ELF_MAGIC:
        problems.add("not an ELF file (bad magic)" if size >= 4
                     else f"file is {size} bytes, too short for the ELF magic")
        return _empty_view(problems)

    elf_class = data[EI_CLASS] if size > EI_CLASS else 0
    endian = data[EI_DATA] if size > EI_DATA else 0
    ident_version = data[EI_VERSION] if size > EI_VERSION else 0

    if elf_class not in (ELFCLASS32, ELFCLASS64):
        problems.add(f"unknown ELF class {elf_class}; decoding the header as ELF64")
    elif elf_class == ELFCLASS32:
        problems.add("ELF32 file; only ELF64 program headers are read")
    if endian not in (ELFDATA2LSB, ELFDATA2MSB):
        problems.add(f"unknown data encoding {endian}; decoding the header as little-endian")
    elif endian == ELFDATA2MSB:
        problems.add("big-endian file; only little-endian program headers are read")
    if ident_version != EV_CURRENT:
        problems.add(f"EI_VERSION is {ident_version}, not {EV_CURRENT}")

    bo = ">" if endian == ELFDATA2MSB else "<"
    is64 = elf_class != ELFCLASS32
    ehdr_size = ELF64_EHDR_SIZE if is64 else ELF32_EHDR_SIZE
    if size < ehdr_size:
        problems.add(
            f"file is {size} bytes, shorter than the {ehdr_size}-byte "
            f"{'ELF64' if is64 else 'ELF32'} header; missing fields read as 0"
        )

    (e_type, machine, version, entry, phoff, shoff, ehsize, phentsize, phnum,
     shnum) = _read_header(data, is64, bo)

    if size >= ehdr_size:
        if e_type != ET_EXEC:
            problems.add(f"e_type is {_TYPE_NAMES.get(e_type, hex(e_type))}, not EXEC")
        if machine != EM_X86_64:
            problems.add(f"e_machine is 0x{machine:x}, not x86-64 (0x{EM_X86_64:x})")
        if version != EV_CURRENT:
            problems.add(f"e_version is 0x{version:x}, not {EV_CURRENT}")
        if ehsize != ehdr_size:
            problems.add(f"e_ehsize is 0x{ehsize:x}, not 0x{ehdr_size:x}")

    headers: tuple[ProgramHeader, ...] = ()
    if elf_class == ELFCLASS64 and endian == ELFDATA2LSB and size >= ehdr_size:
        headers = _read_program_headers(data, phoff, phentsize, phnum, problems)
    return ElfView(
        is_elf=True, elf_class=elf_class, data=endian, machine=machine, e_type=e_type,
        entry=entry, phoff=phoff, phentsize=phentsize, phnum=phnum, shoff=shoff,
        shnum=shnum, program_headers=headers, problems=problems.freeze(),
    )


def load_segments(data: bytes) -> tuple[Segment, ...]:
    """``read_elf(data).load_segments`` without the problem report: what a run compares the
    kernel's segment table with, read for every fuzzed input (natively, where built: the
    body below is the reference)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return ()
    if native_walker is not None:
        segments: tuple[Segment, ...] = native_walker.pt_loads(data, Segment)
        return segments
    return load_segments_python(data)


def load_segments_python(data: bytes | bytearray | memoryview) -> tuple[Segment, ...]:
    data = bytes(data)
    size = len(data)
    if size < ELF64_EHDR_SIZE or data[:4] != ELF_MAGIC or data[EI_CLASS] != ELFCLASS64 \
            or data[EI_DATA] != ELFDATA2LSB:
        return ()
    phoff = _PHOFF64.unpack_from(data, _PHOFF64_AT)[0]
    phentsize, phnum = _PHENTSIZE_PHNUM.unpack_from(data, _PHENTSIZE_PHNUM_AT)
    if phnum == 0 or phoff >= size or size - phoff < ELF64_PHDR_SIZE:
        return ()
    stride = phentsize if phentsize > ELF64_PHDR_SIZE else ELF64_PHDR_SIZE
    count = min(phnum, MAX_PROGRAM_HEADERS, (size - phoff - ELF64_PHDR_SIZE) // stride + 1)
    if stride == ELF64_PHDR_SIZE:
        rows = _PHDR64.iter_unpack(memoryview(data)[phoff:phoff + count * ELF64_PHDR_SIZE])
    else:
        rows = (_PHDR64.unpack_from(data, phoff + i * stride) for i in range(count))
    return tuple(Segment(vaddr, memsz, filesz, offset, flags)
                 for p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align in rows
                 if p_type == PT_LOAD)


def _read_program_headers(
    data: bytes, phoff: int, phentsize: int, phnum: int, problems: _Problems
) -> tuple[ProgramHeader, ...]:
    if phnum == 0:
        problems.add("e_phnum is 0: no program headers")
        return ()
    # entries are e_phentsize apart (a larger entry has padding after the Elf64_Phdr); a
    # smaller one cannot hold an entry, so those are read 56 bytes apart
    stride = phentsize if phentsize > ELF64_PHDR_SIZE else ELF64_PHDR_SIZE
    if phentsize != ELF64_PHDR_SIZE:
        problems.add(
            f"e_phentsize is 0x{phentsize:x}, not 0x{ELF64_PHDR_SIZE:x}; "
            f"reading with a {stride}-byte stride"
        )
    if phnum == PN_XNUM:
        problems.add("e_phnum is PN_XNUM (0xffff); extended numbering is not followed")
    if phoff < ELF64_EHDR_SIZE:
        problems.add(f"program header table at 0x{phoff:x} overlaps the ELF header")

    size = len(data)
    if phoff >= size:
        problems.add(
            f"program header table offset 0x{phoff:x} lies past the end of the file "
            f"(0x{size:x} bytes)"
        )
        return ()
    wanted = min(phnum, MAX_PROGRAM_HEADERS)
    fit = (size - phoff - ELF64_PHDR_SIZE) // stride + 1 if size - phoff >= ELF64_PHDR_SIZE \
        else 0
    count = min(wanted, fit)
    if count < phnum:
        problems.add(
            f"program header {count} lies past the end of the file; "
            f"read {count} of {phnum}"
        )

    if stride == ELF64_PHDR_SIZE:
        raw = memoryview(data)[phoff:phoff + count * ELF64_PHDR_SIZE]
        rows = list(_PHDR64.iter_unpack(raw))
    else:
        rows = [_PHDR64.unpack_from(data, phoff + i * stride) for i in range(count)]
    headers = tuple(ProgramHeader(index, *fields) for index, fields in enumerate(rows))
    for ph in headers:
        if ph.p_type == PT_LOAD:
            _check_load(ph, size, problems)
    return headers


def _check_load(ph: ProgramHeader, file_size: int, problems: _Problems) -> None:
    where = f"program header {ph.index} (LOAD)"
    if ph.filesz > ph.memsz:
        problems.add(f"{where}: p_filesz 0x{ph.filesz:x} exceeds p_memsz 0x{ph.memsz:x}")
    file_end = ph.offset + ph.filesz
    if file_end >= _U64:
        problems.add(f"{where}: p_offset + p_filesz overflows 64 bits")
    elif file_end > file_size:
        problems.add(
            f"{where}: file range 0x{ph.offset:x}..0x{file_end:x} lies past the end of the "
            f"file (0x{file_size:x} bytes)"
        )
    if ph.vaddr + ph.memsz >= _U64:
        problems.add(f"{where}: p_vaddr + p_memsz overflows 64 bits")
    if ph.align > 1:
        if ph.align & (ph.align - 1):
            problems.add(f"{where}: p_align 0x{ph.align:x} is not a power of two")
        elif (ph.vaddr - ph.offset) % ph.align:
            problems.add(f"{where}: p_vaddr and p_offset differ modulo p_align 0x{ph.align:x}")


def describe_header(view: ElfView) -> list[tuple[str, str]]:
    """Field/value pairs for display, numbers in hex."""

    def named(value: int, names: dict[int, str]) -> str:
        name = names.get(value)
        return f"{name} (0x{value:x})" if name else f"0x{value:x}"

    if not view.is_elf:
        return [("magic", "bad (not an ELF file)"), ("problems", str(len(view.problems)))]
    return [
        ("magic", "ok"),
        ("class", named(view.elf_class, _CLASS_NAMES)),
        ("data", named(view.data, _DATA_NAMES)),
        ("type", named(view.e_type, _TYPE_NAMES)),
        ("machine", named(view.machine, _MACHINE_NAMES)),
        ("entry", f"0x{view.entry:x}"),
        ("phoff", f"0x{view.phoff:x}"),
        ("phentsize", f"0x{view.phentsize:x}"),
        ("phnum", f"0x{view.phnum:x}"),
        ("program headers read", f"0x{len(view.program_headers):x}"),
        ("PT_LOAD segments", f"0x{len(view.load_segments):x}"),
        ("shoff", f"0x{view.shoff:x}"),
        ("shnum", f"0x{view.shnum:x}"),
        ("loadable candidate", "yes" if view.is_loadable_candidate else "no"),
        ("problems", str(len(view.problems))),
    ]
