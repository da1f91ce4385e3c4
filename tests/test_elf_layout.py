"""The one declaration of the ELF layouts (kernel_emu.elflayout), the reader, mutator,
minimizer, seed builder and test inputs all use, against pyelftools' independent one."""

from __future__ import annotations

import pytest
from elftools.elf import constants, enums
from elftools.elf.structs import ELFStructs

from kernel_emu import elflayout
from kernel_emu.elflayout import ELF32_EHDR, ELF64_EHDR, ELF64_PHDR, ELF64_SHDR, Record


def _pyelftools(elfclass: int) -> ELFStructs:
    structs = ELFStructs(little_endian=True, elfclass=elfclass)
    structs.create_basic_structs()
    structs.create_advanced_structs(e_type="ET_EXEC", e_machine="EM_X86_64",
                                    e_ident_osabi="ELFOSABI_SYSV")
    return structs


def _cases() -> list[tuple[Record, int, str]]:
    return [(ELF64_EHDR, 64, "Elf_Ehdr"), (ELF64_PHDR, 64, "Elf_Phdr"),
            (ELF64_SHDR, 64, "Elf_Shdr"), (ELF32_EHDR, 32, "Elf_Ehdr")]


@pytest.mark.parametrize(("record", "elfclass", "name"), _cases(),
                         ids=[r.name for r, _, _ in _cases()])
def test_records_match_pyelftools(record: Record, elfclass: int, name: str) -> None:
    theirs = getattr(_pyelftools(elfclass), name)
    assert record.size == theirs.sizeof()
    offset = 0
    expected = []
    for sub in theirs.subcons:
        expected.append((sub.name, offset, sub.sizeof()))
        offset += sub.sizeof()
    assert [(f.name, f.offset, f.size) for f in record] == expected
    # every byte different, so a field read from the wrong place or width shows; pyelftools
    # decodes e_ident's own fields, which have to be valid
    data = bytes(range(1, record.size + 1))
    if "e_ident" in record.fields:
        ident = elflayout.ELF_MAGIC + bytes((elfclass // 32, elflayout.ELFDATA2LSB,
                                             elflayout.EV_CURRENT))
        data = ident + bytes(elflayout.EI_NIDENT - len(ident)) + data[elflayout.EI_NIDENT:]
    parsed = theirs.parse(data)
    for f in record:
        if f.name == "e_ident":  # a struct of its own there; its size was compared above
            continue
        assert f.read(data) == parsed[f.name], f.name
        assert record.le.unpack(data)[f.index] == parsed[f.name], f.name


def test_writing_a_field_changes_only_its_bytes() -> None:
    for record in (ELF64_EHDR, ELF64_PHDR, ELF64_SHDR, ELF32_EHDR):
        for f in record:
            if f.name == "e_ident":
                continue
            buf = bytearray(8 + record.size)
            f.write(buf, f.mask, base=8)
            ones = [i for i, b in enumerate(buf) if b]
            assert ones == list(range(8 + f.offset, 8 + f.offset + f.size)), f.name
            assert f.read(buf, base=8) == f.mask


def test_constants_match_pyelftools() -> None:
    tables = {"PT_": enums.ENUM_P_TYPE_BASE, "ET_": enums.ENUM_E_TYPE,
              "EM_": enums.ENUM_E_MACHINE, "ELFCLASS": enums.ENUM_EI_CLASS,
              "ELFDATA": enums.ENUM_EI_DATA, "EV_": enums.ENUM_E_VERSION}
    checked = 0
    for name in dir(elflayout):
        for prefix, table in tables.items():
            if name.startswith(prefix):
                assert getattr(elflayout, name) == table[name], name
                checked += 1
    assert checked >= 30
    for flag in ("PF_R", "PF_W", "PF_X"):
        assert getattr(elflayout, flag) == getattr(constants.P_FLAGS, flag)
