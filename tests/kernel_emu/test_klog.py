"""The kernel log reader: what it takes from a boot's console, and which of repeated lines win."""

from __future__ import annotations

import random

import pytest

from kernel_emu import klog
from kernel_emu.klog import parse_log

BOOT = """[boot] rustux
[mm] kstack base=0x7fc0000 top=0x8000000
[heap] init base=0x300000 size=0x1000000
[elf] bin/init at 0x100000050, 1384 bytes
[elf] segments count=2
[elf] seg 0 vaddr=0x400000 memsz=0x186 filesz=0x186 offset=0x0 flags=0x5
[elf] seg 1 vaddr=0x4021e8 memsz=0x2018 filesz=0x8 offset=0x1e8 flags=0x6
[elf] entry=0x400120
[user] enter rip=0x400120 rsp=0x7fffffffefc0 cr3=0x7f7f000
"""


def test_a_boot_log() -> None:
    log = parse_log(BOOT)
    assert log.segment_count == 2
    assert log.segments == [
        {"vaddr": 0x400000, "memsz": 0x186, "filesz": 0x186, "offset": 0, "flags": 5},
        {"vaddr": 0x4021E8, "memsz": 0x2018, "filesz": 8, "offset": 0x1E8, "flags": 6}]
    assert log.entry == 0x400120
    assert log.kstack == (0x7FC0000, 0x8000000)
    assert log.user_entry == (0x400120, 0x7FFFFFFFEFC0, 0x7F7F000)
    assert log.rejected is None and log.panic is None


def test_rejection_and_panic_keep_the_first() -> None:
    log = parse_log("rejected: too many segments \nrejected: later\n"
                    "[PANIC] out of memory at src/heap.rs:88\n[PANIC] again\n")
    assert log.rejected == "too many segments"
    assert (log.panic, log.panic_location) == ("out of memory", "src/heap.rs:88")


def test_reading_on_from_a_base_reads_as_the_whole_text() -> None:
    """A base read from the text's first lines gives the log of the whole text, whatever
    line it ends at: the repeated lines still keep the first, and a later segment count
    still starts the table again."""
    text = BOOT + ("rejected: first\n[PANIC] boom at a.rs:1\n[elf] segments count=1\n"
                   "[elf] seg 0 vaddr=0x1000 memsz=0x10 filesz=0x10 offset=0x0 flags=0x4\n"
                   "rejected: second\r\n[PANIC] again\n")
    whole = parse_log(text)
    ends = [i + 1 for i, c in enumerate(text) if c == "\n"]
    for end in ends:
        base = parse_log(text[:end])
        assert parse_log(text, base) == whole, end
    # a base's table is its own: reading on never changes it
    base = parse_log(text[:ends[6]])
    before = [dict(s) for s in base.segments]
    parse_log(text, base)
    assert base.segments == before


def test_a_base_that_does_not_fit_is_ignored() -> None:
    whole = parse_log(BOOT)
    # not a prefix of the text, or not ending a line: the whole text is read
    assert parse_log(BOOT, parse_log("rejected: elsewhere\n")) == whole
    assert parse_log(BOOT, parse_log(BOOT[:20])) == whole
    assert parse_log(BOOT, parse_log("")) == whole


def test_lines_read_before_say_what_they_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line's reading is kept by its text: the same log read with the lines known, with
    none known, through a full store that starts over, and with a line too long to keep (the
    reading in Python, the native one's reference)."""
    monkeypatch.setattr(klog, "native_walker", None)
    text = BOOT + "rejected: first\nrejected: second\n[PANIC] boom at a.rs:1\n[PANIC] x\n" + \
        "[elf] seg 9 vaddr=0x1 memsz=0x2 filesz=0x3 offset=0x4 flags=0x5 " + " " * 300 + "\n"
    klog._SAID.clear()
    fresh = parse_log(text)
    assert fresh.rejected == "first" and fresh.panic == "boom"
    assert fresh.segments[-1] == {"vaddr": 1, "memsz": 2, "filesz": 3, "offset": 4, "flags": 5}
    assert parse_log(text) == fresh  # every line known now
    assert all(len(line) <= klog._LINE_KEPT for line in klog._SAID)
    monkeypatch.setattr(klog, "_SAID_KEPT", 3)
    klog._SAID.clear()
    assert parse_log(text) == fresh
    assert len(klog._SAID) <= 3
    assert parse_log(text) == fresh


# lines like the kernel's, and the characters a mutation puts into them
LINES = BOOT.splitlines() + [
    "rejected: too many segments ", "rejected:\t", "[PANIC] out of memory at src/heap.rs:88",
    "[PANIC] a at b:1 at c:2", "[PANIC] at x:1", "[PANIC]  at x:1", "[PANIC] boom at :1",
    "[PANIC] boom at a.rs:", "[PANIC] boom at a.rs:12 tail", "[PANIC] ", "[PANIC] x \x1f",
    "[elf] segments count=00012 ", "[elf] entry=0x0000000000000000000001",
    "[elf] seg 3 vaddr=0xFFFFFFFFFFFFFFFF memsz=0x0 filesz=0x1 offset=0x2 flags=0x3\t",
    "[mm] kstack base=0x1 top=0x2 and more", "[user] enter rip=0x1 rsp=0x2 cr3=0x3zz"]
NOISE = [" ", "\t", "\x1f", "\x1e", "\r", "\x0b", "0", "9", "a", "F", "x", ":", "=", "[",
         "]", " at ", "0x", "é", "\u2028", "12345678901234567890", "ffffffffffffffff1"]


def _numbers(says: list[tuple[object, ...]]) -> list[int]:
    return [v for what in says for item in what[1:]
            for v in (item if isinstance(item, tuple) else (item,)) if isinstance(v, int)]


def test_the_native_reading_says_what_each_line_says() -> None:
    """The native reading of a console gives what the lines say as the reference reads them
    one by one, for lines like the kernel's with characters put in, taken out or changed,
    and says only of the texts it cannot follow (another line break, a character past ASCII,
    a number of 2**64 or more) that it cannot."""
    assert klog.native_walker is not None, "the native walker is not built"
    rng = random.Random(7)
    read = deferred = 0
    for _ in range(20000):
        lines = []
        for _ in range(rng.randrange(1, 6)):
            line = rng.choice(LINES)
            for _ in range(rng.randrange(0, 3)):
                at = rng.randrange(len(line) + 1)
                cut = rng.choice((0, 0, 1, 2))
                line = line[:at] + rng.choice(NOISE + [""]) + line[at + cut:]
            lines.append(line)
        text = "\n".join(lines) + rng.choice(("", "\n"))
        got = klog.native_walker.log_lines(text)
        want = klog._lines_say(text)
        if got is None:
            deferred += 1
            assert not text.isascii() or any(c in text for c in "\r\x0b\x0c\x1c\x1d\x1e") \
                or any(v >> 64 for v in _numbers(want)), text
            continue
        read += 1
        assert got == want, text
    assert read > 10000 and deferred > 1000, (read, deferred)
