"""Read the kernel's debug-console log: segment table, rejection, panic, user entry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SEG = re.compile(
    r"^\[elf\] seg (\d+) vaddr=(0x[0-9a-fA-F]+) memsz=(0x[0-9a-fA-F]+) "
    r"filesz=(0x[0-9a-fA-F]+) offset=(0x[0-9a-fA-F]+) flags=(0x[0-9a-fA-F]+)\s*$")
_COUNT = re.compile(r"^\[elf\] segments count=(\d+)\s*$")
_ENTRY = re.compile(r"^\[elf\] entry=(0x[0-9a-fA-F]+)\s*$")
_PANIC = re.compile(r"^\[PANIC\] (.*?)(?: at ([^\s:]+):(\d+))?\s*$")
_KSTACK = re.compile(r"^\[mm\] kstack base=(0x[0-9a-fA-F]+) top=(0x[0-9a-fA-F]+)")
_USER = re.compile(r"^\[user\] enter rip=(0x[0-9a-fA-F]+) rsp=(0x[0-9a-fA-F]+) "
                   r"cr3=(0x[0-9a-fA-F]+)")


@dataclass
class KernelLog:
    text: str
    segment_count: int | None = None
    segments: list[dict[str, int]] = field(default_factory=list)
    entry: int | None = None
    rejected: str | None = None
    panic: str | None = None
    panic_location: str | None = None
    kstack: tuple[int, int] | None = None
    user_entry: tuple[int, int, int] | None = None


def parse_log(text: str, base: KernelLog | None = None) -> KernelLog:
    """The log `text` says. `base`: what a prefix of `text` that ends a line says (the console
    up to the snapshot, the same in every run): only the rest is read, the way a reading of
    the whole text would go on from there. A `base` that is not a prefix of `text` is
    ignored."""
    if base is not None and base.text and base.text[-1] == "\n" and text.startswith(base.text):
        log = KernelLog(text, base.segment_count, [dict(s) for s in base.segments], base.entry,
                        base.rejected, base.panic, base.panic_location, base.kstack,
                        base.user_entry)
        return _read_lines(log, text[len(base.text):])
    return _read_lines(KernelLog(text), text)


def _read_lines(log: KernelLog, text: str) -> KernelLog:
    for line in text.splitlines():
        if not line.startswith(("[elf]", "rejected: ", "[PANIC]", "[mm] kstack", "[user]")):
            continue
        if m := _SEG.match(line):
            _, vaddr, memsz, filesz, offset, flags = m.groups()
            log.segments.append({"vaddr": int(vaddr, 16), "memsz": int(memsz, 16),
                                 "filesz": int(filesz, 16), "offset": int(offset, 16),
                                 "flags": int(flags, 16)})
        elif m := _COUNT.match(line):
            log.segment_count = int(m.group(1))
            log.segments = []
        elif m := _ENTRY.match(line):
            log.entry = int(m.group(1), 16)
        elif line.startswith("rejected: ") and log.rejected is None:
            log.rejected = line[len("rejected: "):].strip()
        elif (m := _PANIC.match(line)) and log.panic is None:
            log.panic = m.group(1)
            if m.group(2):
                log.panic_location = f"{m.group(2)}:{m.group(3)}"
        elif m := _KSTACK.match(line):
            log.kstack = (int(m.group(1), 16), int(m.group(2), 16))
        elif m := _USER.match(line):
            log.user_entry = (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
    return log
