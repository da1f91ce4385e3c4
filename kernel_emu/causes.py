"""Causes in the input: a crash that a field of the ELF header, had the kernel checked it,
would not have let happen.

Some fields of an ELF64 x86-64 executable's header have one standard value: the magic, the
class, the byte order, the versions, the machine, the sizes of the header and of a table's
entries. A loader must check such fields, or never read them. One that uses such a field
unchecked fails in ways that depend on the value: a program-header stride of 0 walks the same
entry for ever, one of 16 reads entries across two program headers, one of 112 with a table
end counted in 56-byte entries reads half the table. Where the damage shows says little
about the bug, so signatures taken there file one missing check under as many buckets as it
has symptoms.

So a crash whose input has another value in such a field is booted again with that one field
put right, nothing else changed. For the program headers' entry size that means the same
entries, laid out at the standard size: the farm's ELF reader (kernel_emu.elfview) reads
entries a larger size apart (the rest of each is padding) and entries a smaller size 56 bytes
apart (none can be smaller), so the file put right means what the oracles took the original
to mean. Where moving the entries would change anything else the file says (a note they
would land on, the header itself), the field is not judged. Section headers are read by no
oracle: their entry size alone is put right. Nor is any other field judged whose bytes a
program header lies over (a table at offset 0 overlaps the header, and e_shentsize is then
part of an entry's type): put right, the field would change that entry too. If the
crash does not happen then (no finding of the second run has the first's signature), the
field is its cause: the Result gets a finding of class `unchecked-field` at site `ELF
header`, field `e_phentsize` (say), before everything the run found, which the chain keeps as
its consequences. Fields are tried in file order; the first whose value alone makes the
difference is the cause. A crash the standard value does not take away keeps its own
signature: the field was unusual, but not why the kernel crashed.

Fields with a range of legal values (`p_filesz` up to `p_memsz`, say) are not judged here:
there is no one right value to put in place, and what the kernel did with the value is what
the other oracles name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from kernel_emu.elflayout import (
    EI_CLASS,
    EI_DATA,
    EI_VERSION,
    ELF64_EHDR,
    ELF64_EHDR_SIZE,
    ELF64_PHDR_SIZE,
    ELF64_SHDR_SIZE,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    EM_X86_64,
    EV_CURRENT,
    PT_NOTE,
)
from kernel_emu.elfview import read_elf
from kernel_emu.result import CrashClass, Finding, Result, Verdict

# the site every finding of this module names: the file's header, not where the run stopped
ELF_HEADER = "ELF header"


@dataclass(frozen=True)
class FixedField:
    """A header field with one standard value (`when`: only if that holds of the file, e.g. a
    table entry's size only matters when the table has entries). `table`: for an entry size,
    the header fields that say where the table is and how many entries it has."""

    name: str
    offset: int
    size: int
    value: int
    meaning: str
    when: Callable[[bytes], bool] | None = None
    table: tuple[str, str] | None = None

    def broken(self, data: bytes) -> bool:
        return self.read(data) != self.value and (self.when is None or self.when(data))

    def read(self, data: bytes) -> int:
        return int.from_bytes(data[self.offset:self.offset + self.size], "little")

    def put_right(self, data: bytes) -> bytes | None:
        """`data` with the standard value; for an entry size, with the entries that a larger
        size pads moved to the standard size apart (in place, front to back: an entry only
        ever moves onto bytes of itself or of entries already moved). None when that cannot
        be done without changing what the file says otherwise (the moved entries land on a
        note, say, or the table lies over the header itself, the field included)."""
        if self.table is None and _under_an_entry(data, self.offset, self.size):
            return None  # (a table's own entry size is what lays its entries out: judged)
        out = bytearray(data)
        stride = self.read(data)
        out[self.offset:self.offset + self.size] = self.value.to_bytes(self.size, "little")
        if self.table is not None and stride > self.value:
            start, count = (ELF64_EHDR[name].read(data) for name in self.table)
            if start < ELF64_EHDR_SIZE:
                return None
            for i in range(count):
                src, dst = start + i * stride, start + i * self.value
                if src + self.value > len(out):
                    break
                out[dst:dst + self.value] = out[src:src + self.value]
            return bytes(out) if _same_entries(data, bytes(out)) else None
        return bytes(out)

    def format(self, value: int) -> str:
        return f"{value:#0{2 + 2 * self.size}x}" if self.name == "EI_MAG" else f"{value:#x}"

    def right(self) -> str:
        """The field put right, in words."""
        laid = f" (the same entries, {self.value:#x} apart)" if self.table else ""
        return f"{self.name} {self.format(self.value)}{laid}"


def _under_an_entry(data: bytes, offset: int, size: int) -> bool:
    """Whether a program header lies over the header's bytes [offset, offset + size): the
    table as the header places it, its entries `e_phentsize` apart or, smaller, 56 (as the
    kernel may read them, and as the farm's reader does)."""
    phoff, phnum = ELF64_EHDR["e_phoff"].read(data), ELF64_EHDR["e_phnum"].read(data)
    if phnum == 0 or phoff >= offset + size:
        return False
    stride = max(ELF64_EHDR["e_phentsize"].read(data), ELF64_PHDR_SIZE)
    return phoff + (phnum - 1) * stride + ELF64_PHDR_SIZE > offset


def _same_entries(before: bytes, after: bytes) -> bool:
    """`after` has the program headers the farm's ELF reader reads in `before`, and the same
    bytes in every note they point at: the kernel reads nothing else of a file differently
    (the bytes a PT_LOAD copies are compared with the file they came from)."""
    was, now = read_elf(before).program_headers, read_elf(after).program_headers
    return was == now and all(
        before[ph.offset:ph.offset + ph.filesz] == after[ph.offset:ph.offset + ph.filesz]
        for ph in was if ph.p_type == PT_NOTE)


def _count(name: str) -> Callable[[bytes], bool]:
    field = ELF64_EHDR[name]
    return lambda data: field.read(data) != 0


def _at(name: str) -> int:
    return ELF64_EHDR.offset(name)


FIXED_FIELDS: tuple[FixedField, ...] = (
    FixedField("EI_MAG", 0, 4, int.from_bytes(ELF_MAGIC, "little"), "the ELF magic"),
    FixedField("EI_CLASS", EI_CLASS, 1, ELFCLASS64, "ELFCLASS64"),
    FixedField("EI_DATA", EI_DATA, 1, ELFDATA2LSB, "little-endian (ELFDATA2LSB)"),
    FixedField("EI_VERSION", EI_VERSION, 1, EV_CURRENT, "EV_CURRENT, the one version"),
    FixedField("e_machine", _at("e_machine"), 2, EM_X86_64, "EM_X86_64, for an amd64 kernel"),
    FixedField("e_version", _at("e_version"), 4, EV_CURRENT, "EV_CURRENT, the one version"),
    FixedField("e_ehsize", _at("e_ehsize"), 2, ELF64_EHDR_SIZE,
               "the size of an Elf64_Ehdr"),
    FixedField("e_phentsize", _at("e_phentsize"), 2, ELF64_PHDR_SIZE,
               "the size of an Elf64_Phdr", when=_count("e_phnum"),
               table=("e_phoff", "e_phnum")),
    # the farm reads no section headers: the value alone is put right, nothing re-laid
    FixedField("e_shentsize", _at("e_shentsize"), 2, ELF64_SHDR_SIZE,
               "the size of an Elf64_Shdr", when=_count("e_shnum")),
)


def _standard_spans(fields: tuple[FixedField, ...]) -> tuple[tuple[int, bytes], ...]:
    """The fields' standard values as the bytes of a header holding them all, joined where
    fields adjoin: (offset, bytes) per span."""
    spans: list[tuple[int, bytes]] = []
    for f in sorted(fields, key=lambda f: f.offset):
        value = f.value.to_bytes(f.size, "little")
        if spans and spans[-1][0] + len(spans[-1][1]) == f.offset:
            spans[-1] = (spans[-1][0], spans[-1][1] + value)
        else:
            spans.append((f.offset, value))
    return tuple(spans)


# a header whose fixed fields all hold their standard values has none broken, whatever the
# conditions say: nearly every input a fuzzing job judges (a few slices instead of nine reads)
_STANDARD = _standard_spans(FIXED_FIELDS)


def broken_fields(data: bytes) -> list[FixedField]:
    """The fields `data` has another value in than the standard one, in file order (none for
    a file too short to hold an ELF64 header)."""
    if len(data) < ELF64_EHDR_SIZE:
        return []
    for at, standard in _STANDARD:
        if data[at:at + len(standard)] != standard:
            return [f for f in FIXED_FIELDS if f.broken(data)]
    return []


def outcome(result: Result) -> str:
    """What a run came to, in a few words."""
    if result.verdict == Verdict.CRASH:
        return f"crashes otherwise ({result.signature})"
    if result.verdict == Verdict.REJECTED:
        return f"rejects it ({result.reject_reason})"
    return "loads it"


def cause_finding(data: bytes, field: FixedField, consequence: Finding, after: str) -> Finding:
    """The finding that names `field` as the cause of `consequence` (`after`: what the kernel
    did with the field put right, as `outcome` says)."""
    return Finding(
        CrashClass.UNCHECKED_FIELD,
        [f"{field.name} is {field.format(field.read(data))}, not {field.format(field.value)} "
         f"({field.meaning})",
         f"with {field.right()} and nothing else changed, the kernel {after}: it used the "
         f"field unchecked, and the crash below follows from it"],
        frames=list(consequence.frames), field=field.name, pc=consequence.pc, site=ELF_HEADER)


def with_cause(result: Result, cause: Finding) -> Result:
    """`result` with `cause` first, the crash it found kept as its consequences."""
    return replace(result, crash_class=cause.cls, signature=cause.signature(),
                   findings=[cause] + list(result.findings))


def attribute(data: bytes, result: Result, boot: Callable[[bytes], Result],
              known: dict[str, str | None] | None = None
              ) -> tuple[Result, FixedField | None, str | None]:
    """`result` (of booting `data`) with its cause in the input, if a field of the header is
    one; `boot` boots another input the same way (its errors are the caller's: a harness
    error is never a cause). Also the field (None: no cause found) and what the kernel did
    with it put right. `known`: what earlier inputs of this signature said of each field
    (field name -> what the kernel did with it put right, None where the crash stayed),
    taken for this input's instead of booting again, and added to."""
    if result.verdict != Verdict.CRASH or not result.findings or result.signature is None:
        return result, None, None
    for field in broken_fields(data):
        if known is not None and field.name in known:
            after = known[field.name]
            if after is not None:
                after += ", as an earlier input with this signature showed"
        else:
            right = field.put_right(data)
            if right is None:
                continue  # no file says the same with the field put right: not judged
            other = boot(right)
            # the crash happens all the same: the field is wrong, but not the cause
            after = None if any(f.signature() == result.signature for f in other.findings) \
                else outcome(other)
            if known is not None:
                known[field.name] = after
        if after is not None:
            return with_cause(result, cause_finding(data, field, result.findings[0], after)), \
                field, after
    return result, None, None
