"""The ELF layouts the farm reads and writes, declared once.

Every module that looks inside an ELF file (the hardened reader, the mutator, the minimizer,
the seed builder, the tests' input builders) takes its offsets, sizes, struct formats and
constants from here, so a field can only ever be in one place. Names are the ELF
specification's (`e_phoff`, `p_vaddr`, `sh_offset`); offsets are counted from the start of
the header or table entry they belong to. Standard library only.

The kernel's loader accepts ELF64 little-endian files alone, so those layouts carry a ready
`struct.Struct`; the ELF32 header is declared as well because the reader still reports what
such a file claims to be. A record's `fmt` has no byte-order prefix: a reader that meets a
big-endian header prefixes its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

ELF_MAGIC = b"\x7fELF"

# e_ident
EI_CLASS = 4
EI_DATA = 5
EI_VERSION = 6
EI_OSABI = 7
EI_ABIVERSION = 8
EI_PAD = 9  # padding up to EI_NIDENT
EI_NIDENT = 16

ELFCLASSNONE = 0
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATANONE = 0
ELFDATA2LSB = 1
ELFDATA2MSB = 2
EV_CURRENT = 1

ET_NONE = 0
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
ET_CORE = 4

EM_NONE = 0
EM_386 = 3
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243

PT_NULL = 0
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4
PT_SHLIB = 5
PT_PHDR = 6
PT_TLS = 7
PT_GNU_EH_FRAME = 0x6474E550
PT_GNU_STACK = 0x6474E551
PT_GNU_RELRO = 0x6474E552
PT_GNU_PROPERTY = 0x6474E553

PF_X = 1
PF_W = 2
PF_R = 4

# e_phnum value that defers the real count to section header 0 (extended numbering)
PN_XNUM = 0xFFFF


class Field:
    """One field of a record: where it starts, how wide it is, its struct code."""

    __slots__ = ("name", "index", "offset", "code", "size", "mask", "le")

    def __init__(self, name: str, index: int, offset: int, code: str) -> None:
        self.name = name
        self.index = index  # position in the tuple the record's struct unpacks to
        self.offset = offset
        self.code = code  # struct format code without byte order: "H", "I", "Q", "16s"
        # the field alone, little-endian, for reading or writing it in place
        self.le = struct.Struct("<" + code)
        self.size = self.le.size
        # every bit of an integer field: a wider value is cut to this before it is written
        self.mask = (1 << (8 * self.size)) - 1

    def read(self, data: bytes | bytearray | memoryview, base: int = 0) -> int:
        """The field of the record at `base` in `data` (struct.error when it does not fit)."""
        value: int = self.le.unpack_from(data, base + self.offset)[0]
        return value

    def write(self, buf: bytearray | memoryview, value: int, base: int = 0) -> None:
        """Set the field of the record at `base` in `buf` (struct.error when out of range)."""
        self.le.pack_into(buf, base + self.offset, value)

    def __repr__(self) -> str:
        return f"Field({self.name}, offset {self.offset}, {self.size} bytes)"


class Record:
    """A fixed-size C struct of the ELF format: its fields in order, without padding."""

    def __init__(self, name: str, fields: Sequence[tuple[str, str]]) -> None:
        self.name = name
        built: list[Field] = []
        offset = 0
        for index, (field_name, code) in enumerate(fields):
            built.append(Field(field_name, index, offset, code))
            offset += struct.calcsize("<" + code)
        self.fields: dict[str, Field] = {f.name: f for f in built}
        self.names: tuple[str, ...] = tuple(self.fields)
        self.fmt = "".join(code for _, code in fields)
        # "<" packs without alignment, so offsets are plain running sums: the ELF structs
        # are laid out so that their natural alignment adds no padding either
        self.le = struct.Struct("<" + self.fmt)
        self.size = self.le.size

    def __getitem__(self, name: str) -> Field:
        return self.fields[name]

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields.values())

    def offset(self, name: str) -> int:
        return self.fields[name].offset

    def __repr__(self) -> str:
        return f"Record({self.name}, {self.size} bytes)"


ELF64_EHDR = Record("Elf64_Ehdr", (
    ("e_ident", f"{EI_NIDENT}s"), ("e_type", "H"), ("e_machine", "H"), ("e_version", "I"),
    ("e_entry", "Q"), ("e_phoff", "Q"), ("e_shoff", "Q"), ("e_flags", "I"),
    ("e_ehsize", "H"), ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"),
    ("e_shnum", "H"), ("e_shstrndx", "H"),
))
ELF32_EHDR = Record("Elf32_Ehdr", (
    ("e_ident", f"{EI_NIDENT}s"), ("e_type", "H"), ("e_machine", "H"), ("e_version", "I"),
    ("e_entry", "I"), ("e_phoff", "I"), ("e_shoff", "I"), ("e_flags", "I"),
    ("e_ehsize", "H"), ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"),
    ("e_shnum", "H"), ("e_shstrndx", "H"),
))
ELF64_PHDR = Record("Elf64_Phdr", (
    ("p_type", "I"), ("p_flags", "I"), ("p_offset", "Q"), ("p_vaddr", "Q"),
    ("p_paddr", "Q"), ("p_filesz", "Q"), ("p_memsz", "Q"), ("p_align", "Q"),
))
ELF64_SHDR = Record("Elf64_Shdr", (
    ("sh_name", "I"), ("sh_type", "I"), ("sh_flags", "Q"), ("sh_addr", "Q"),
    ("sh_offset", "Q"), ("sh_size", "Q"), ("sh_link", "I"), ("sh_info", "I"),
    ("sh_addralign", "Q"), ("sh_entsize", "Q"),
))

ELF64_EHDR_SIZE = ELF64_EHDR.size
ELF32_EHDR_SIZE = ELF32_EHDR.size
ELF64_PHDR_SIZE = ELF64_PHDR.size
ELF64_SHDR_SIZE = ELF64_SHDR.size
