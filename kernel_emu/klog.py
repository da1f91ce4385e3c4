"""Read the kernel's debug-console log: segment table, rejection, panic, user entry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: every line read in Python
    native_walker = None  # type: ignore[assignment]

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
        # every field of the base, its table a copy of its own (as `replace` would make it,
        # without its pass through the fields and __init__: a quarter of a reading's time)
        log = KernelLog.__new__(KernelLog)
        log.__dict__.update(base.__dict__)
        log.text, log.segments = text, [dict(s) for s in base.segments]
        return _read_lines(log, text[len(base.text):])
    return _read_lines(KernelLog(text), text)


def _read_lines(log: KernelLog, text: str) -> KernelLog:
    # natively, every line at once; else, or where the native reading cannot follow
    # _line_says exactly, line by line (_lines_say)
    says = native_walker.log_lines(text) if native_walker is not None else None
    for what in _lines_say(text) if says is None else says:
        kind = what[0]
        if kind == _SEG_LINE:
            _, vaddr, memsz, filesz, offset, flags = what
            log.segments.append({"vaddr": vaddr, "memsz": memsz, "filesz": filesz,
                                 "offset": offset, "flags": flags})
        elif kind == _COUNT_LINE:
            log.segment_count = what[1]
            log.segments = []
        elif kind == _ENTRY_LINE:
            log.entry = what[1]
        elif kind == _REJECTED_LINE:
            if log.rejected is None:
                log.rejected = what[1]
        elif kind == _PANIC_LINE:
            if log.panic is None:
                log.panic = what[1]
                if what[2] is not None:
                    log.panic_location = what[2]
        elif kind == _KSTACK_LINE:
            log.kstack = what[1]
        else:
            log.user_entry = what[1]
    return log


def _lines_say(text: str) -> list[tuple[Any, ...]]:
    """What the lines of `text` that say something say, in order (the reference of the
    native log_lines)."""
    said, kept = _SAID, _SAID_KEPT
    out = []
    for line in text.splitlines():
        what = said.get(line, _UNREAD)
        if what is _UNREAD:
            what = _line_says(line)
            if len(line) <= _LINE_KEPT:
                if len(said) >= kept:
                    said.clear()
                said[line] = what
        if what is not None:
            out.append(what)
    return out


# What a line says does not depend on the lines around it (a rejection or panic after the
# first is read, and ignored, where it is applied), and a run's console repeats most lines of
# earlier runs: the segment table of a mutated input, say. So each line is read once, and what
# it says kept by its text (lines up to _LINE_KEPT characters, _SAID_KEPT of them at most).
_SEG_LINE, _COUNT_LINE, _ENTRY_LINE, _REJECTED_LINE, _PANIC_LINE, _KSTACK_LINE, _USER_LINE = \
    range(7)
_UNREAD: tuple[Any, ...] = ("not read yet",)
_SAID: dict[str, tuple[Any, ...] | None] = {}
_SAID_KEPT = 1 << 16
_LINE_KEPT = 256


def _line_says(line: str) -> tuple[Any, ...] | None:
    """What one console line says, as `_read_lines` applies it; None: nothing."""
    if not line.startswith(("[elf]", "rejected: ", "[PANIC]", "[mm] kstack", "[user]")):
        return None
    if m := _SEG.match(line):
        _, vaddr, memsz, filesz, offset, flags = m.groups()
        return (_SEG_LINE, int(vaddr, 16), int(memsz, 16), int(filesz, 16), int(offset, 16),
                int(flags, 16))
    if m := _COUNT.match(line):
        return _COUNT_LINE, int(m.group(1))
    if m := _ENTRY.match(line):
        return _ENTRY_LINE, int(m.group(1), 16)
    if line.startswith("rejected: "):
        return _REJECTED_LINE, line[len("rejected: "):].strip()
    if m := _PANIC.match(line):
        return _PANIC_LINE, m.group(1), f"{m.group(2)}:{m.group(3)}" if m.group(2) else None
    if m := _KSTACK.match(line):
        return _KSTACK_LINE, (int(m.group(1), 16), int(m.group(2), 16))
    if m := _USER.match(line):
        return _USER_LINE, (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
    return None
