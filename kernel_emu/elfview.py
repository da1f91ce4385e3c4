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

ELF_MAGIC = b"\x7fELF"

ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62

PT_LOAD = 1
PF_X = 1
PF_W = 2
PF_R = 4

# e_phnum value that defers the real count to section header 0 (extended numbering).
PN_XNUM = 0xFFFF

ELF64_EHDR_SIZE = 64
ELF32_EHDR_SIZE = 52
ELF64_PHDR_SIZE = 56
# e_phnum is 16 bits, so this also bounds the work a single file can cause.
MAX_PROGRAM_HEADERS = 65535
# A mutated file can have thousands of bad headers; past this the list stops being useful.
MAX_PROBLEMS = 64

_U64 = 1 << 64

_PHDR64 = struct.Struct("<IIQQQQQQ")
_U64_AT = struct.Struct("<Q")
_TWO_U16_AT = struct.Struct("<HH")

_CLASS_NAMES = {0: "NONE", ELFCLASS32: "ELF32", ELFCLASS64: "ELF64"}
_DATA_NAMES = {0: "NONE", ELFDATA2LSB: "little-endian", ELFDATA2MSB: "big-endian"}
_TYPE_NAMES = {0: "NONE", 1: "REL", ET_EXEC: "EXEC", 3: "DYN", 4: "CORE"}
_MACHINE_NAMES = {0: "none", 3: "x86", 40: "ARM", EM_X86_64: "x86-64", 183: "AArch64",
                  243: "RISC-V"}
_PT_NAMES = {0: "NULL", PT_LOAD: "LOAD", 2: "DYNAMIC", 3: "INTERP", 4: "NOTE", 5: "SHLIB",
             6: "PHDR", 7: "TLS", 0x6474E550: "GNU_EH_FRAME", 0x6474E551: "GNU_STACK",
             0x6474E552: "GNU_RELRO", 0x6474E553: "GNU_PROPERTY"}


# NamedTuples: built for every input, several times cheaper than frozen dataclasses
class ProgramHeader(NamedTuple):
    """One Elf64_Phdr exactly as stored (raw 64-bit values, nothing validated)."""

    index: int
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


def _read(data: bytes, fmt: str, offset: int) -> int:
    """One unsigned field, or 0 when it does not fit in the data."""
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        return 0
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


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

    elf_class = data[4] if size > 4 else 0
    endian = data[5] if size > 5 else 0
    ident_version = data[6] if size > 6 else 0

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

    e_type = _read(data, bo + "H", 16)
    machine = _read(data, bo + "H", 18)
    version = _read(data, bo + "I", 20)
    if is64:
        entry = _read(data, bo + "Q", 24)
        phoff = _read(data, bo + "Q", 32)
        shoff = _read(data, bo + "Q", 40)
        ehsize = _read(data, bo + "H", 52)
        phentsize = _read(data, bo + "H", 54)
        phnum = _read(data, bo + "H", 56)
        shnum = _read(data, bo + "H", 60)
    else:
        entry = _read(data, bo + "I", 24)
        phoff = _read(data, bo + "I", 28)
        shoff = _read(data, bo + "I", 32)
        ehsize = _read(data, bo + "H", 40)
        phentsize = _read(data, bo + "H", 42)
        phnum = _read(data, bo + "H", 44)
        shnum = _read(data, bo + "H", 48)

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
    kernel's segment table with, read for every fuzzed input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return ()
    data = bytes(data)
    size = len(data)
    if size < ELF64_EHDR_SIZE or data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 \
            or data[5] != ELFDATA2LSB:
        return ()
    phoff = _U64_AT.unpack_from(data, 32)[0]
    phentsize, phnum = _TWO_U16_AT.unpack_from(data, 54)
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
