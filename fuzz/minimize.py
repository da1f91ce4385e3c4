"""Shrink a crashing input while keeping its crash signature.

A candidate is kept only when it boots to a crash with exactly the original signature. The
structure-aware passes come first because they keep the ELF well-formed, so most of their
candidates still reach the loader and a few hundred runs remove kilobytes; byte-level delta
debugging then removes and zeroes what the ELF model does not know about, and a last pass
cuts the tail of the file.

Every pass only ever makes things smaller (file length, e_phnum, p_filesz, file offsets,
field values, set bits), so the rounds end even without the execution budget.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fuzz.progress import ProgressLine
from kernel_emu.elflayout import (
    EI_NIDENT,
    EI_OSABI,
    EI_VERSION,
    ELF64_EHDR,
    ELF64_EHDR_SIZE,
    ELF64_PHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    PT_LOAD,
    Field,
)
from kernel_emu.elfview import ElfView, ProgramHeader, read_elf
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.executor import Executor
from kernel_emu.result import Result

EXIT_OK, EXIT_ERROR = 0, 2
PROGRESS_EVERY = 50
# runs kept back from the earlier phases so the final tail cut always gets to run
TAIL_RESERVE = 256
# all pairs of program headers is quadratic; past this many only single entries and blocks
MAX_PAIR_HEADERS = 16

E_PHOFF = ELF64_EHDR["e_phoff"]
E_PHNUM = ELF64_EHDR["e_phnum"]
# the ELF header's account of the section header table
SECTION_FIELDS = tuple(ELF64_EHDR[name] for name in
                       ("e_shoff", "e_shentsize", "e_shnum", "e_shstrndx"))
# (offset, size) of what the loader has no use for, tried as zero one at a time: EI_VERSION,
# the rest of e_ident, e_version, e_entry, e_flags, e_ehsize
HEADER_FIELDS = ((EI_VERSION, 1), (EI_OSABI, EI_NIDENT - EI_OSABI),
                 *((ELF64_EHDR[name].offset, ELF64_EHDR[name].size)
                   for name in ("e_version", "e_entry", "e_flags", "e_ehsize")))

P_FLAGS = ELF64_PHDR["p_flags"]
P_OFFSET = ELF64_PHDR["p_offset"]
P_VADDR = ELF64_PHDR["p_vaddr"]
P_PADDR = ELF64_PHDR["p_paddr"]
P_FILESZ = ELF64_PHDR["p_filesz"]
P_MEMSZ = ELF64_PHDR["p_memsz"]
P_ALIGN = ELF64_PHDR["p_align"]


class NotACrash(InputError):
    """The input given to the minimizer does not crash the kernel, so there is nothing to keep."""


class _OutOfBudget(Exception):
    """The executions allowed for the current phase are spent."""


@dataclass
class MinimizeOutcome:
    data: bytes  # smallest input found that keeps the signature
    original_size: int
    size: int
    signature: str
    crash_class: str
    executions: int  # boots, the original's included
    result: Result  # the Result of `data`
    harness_errors: int = 0  # candidates the harness failed on (counted as not kept)


def _digest(data: bytes) -> bytes:
    # digests rather than the candidates themselves: 20 000 copies of a large file add up
    return hashlib.blake2b(data, digest_size=16).digest()


class _Search:
    """The current best input and the predicate, with a cache and an execution budget."""

    def __init__(self, executor: Executor, data: bytes, result: Result,
                 progress: Callable[[int, int], None] | None) -> None:
        self.executor = executor
        self.signature = result.signature
        self.best = data
        self.best_result = result
        self.executions = 1
        self.harness_errors = 0
        self.limit = 1
        self.progress = progress
        self._seen = {_digest(data)}

    def keeps(self, candidate: bytes) -> bool:
        """Whether `candidate` crashes with the signature; if so it becomes the best."""
        key = _digest(candidate)
        # a candidate seen before is either a rejected one or an earlier best, and going back
        # to an earlier best would undo progress
        if key in self._seen:
            return False
        if self.executions >= self.limit:
            raise _OutOfBudget
        self._seen.add(key)
        self.executions += 1
        try:
            result: Result | None = self.executor.run(candidate)
        except HarnessError:
            # the farm failing on a candidate says nothing about the kernel
            self.harness_errors += 1
            result = None
        kept = (result is not None and result.verdict == "crash"
                and result.signature == self.signature)
        if kept and result is not None:
            self.best, self.best_result = candidate, result
        if self.progress is not None and self.executions % PROGRESS_EVERY == 0:
            self.progress(self.executions, len(self.best))
        return kept


# reading and patching the ELF ------------------------------------------------------------

def _layout(data: bytes) -> ElfView | None:
    """What a little-endian ELF64 file's headers say (its program header table walked as the
    kernel walks it), or None for anything else."""
    if len(data) < ELF64_EHDR_SIZE:
        return None
    view = read_elf(data)
    if not view.is_elf or view.elf_class != ELFCLASS64 or view.data != ELFDATA2LSB:
        return None
    return view


def _table_end(lay: ElfView, size: int) -> int:
    """The end of the program header entries present in the file."""
    return min(size, lay.phdr_offset(len(lay.program_headers)))


def _put(data: bytes, base: int, field: Field, value: int) -> bytes:
    """`data` with `field` of the header or entry at `base` set to `value`."""
    out = bytearray(data)
    field.write(out, value, base)
    return bytes(out)


def _zeroed(data: bytes, offset: int, size: int) -> bytes:
    return data[:offset] + bytes(size) + data[offset + size:]


def _file_range(ph: ProgramHeader, size: int) -> tuple[int, int] | None:
    """The bytes a PT_LOAD copies from the file, when they lie inside it."""
    if ph.p_type != PT_LOAD or ph.filesz == 0 or ph.offset + ph.filesz > size:
        return None
    return ph.offset, ph.offset + ph.filesz


def _live_ranges(data: bytes, lay: ElfView) -> list[tuple[int, int]]:
    """Merged byte ranges something in the headers refers to (section headers excepted)."""
    ranges = [(0, ELF64_EHDR_SIZE)]
    if lay.program_headers:
        ranges.append((lay.phoff, _table_end(lay, len(data))))
    for ph in lay.program_headers:
        span = _file_range(ph, len(data))
        if span is not None:
            ranges.append(span)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _referenced_end(data: bytes, lay: ElfView) -> int:
    return min(len(data), _live_ranges(data, lay)[-1][1])


def _without_entries(data: bytes, lay: ElfView, drop: Sequence[int]) -> bytes:
    """Program headers `drop` removed, later entries moved up and e_phnum lowered."""
    end = _table_end(lay, len(data))
    kept = [data[lay.phdr_offset(i):min(lay.phdr_offset(i + 1), end)]
            for i in range(len(lay.program_headers)) if i not in drop]
    table = b"".join(kept)
    out = data[:lay.phoff] + table + bytes(end - lay.phoff - len(table)) + data[end:]
    return _put(out, 0, E_PHNUM, lay.phnum - len(drop))


def _without_gap(data: bytes, lay: ElfView, start: int, stop: int) -> bytes | None:
    """Bytes [start, stop) removed, or the largest tail of them that keeps every moved
    segment's p_offset congruent to its p_vaddr modulo p_align; None when nothing can go."""
    moved = [ph for ph in lay.program_headers
             if ph.p_type == PT_LOAD and stop <= ph.offset <= len(data)]
    step = 1
    for ph in moved:
        if ph.align > 1:
            step = math.lcm(step, ph.align)
    cut = (stop - start) // step * step
    if cut == 0:
        return None
    start = stop - cut
    out = data[:start] + data[stop:]
    phoff = lay.phoff
    if lay.program_headers and phoff >= stop:
        phoff -= cut
        out = _put(out, 0, E_PHOFF, phoff)
    for ph in lay.program_headers:
        if ph.p_type != PT_LOAD:
            continue
        entry = phoff + ph.index * lay.phdr_stride
        if stop <= ph.offset <= len(data):
            out = _put(out, entry, P_OFFSET, ph.offset - cut)
        elif start <= ph.offset < stop:  # an empty segment pointing into the removed bytes
            out = _put(out, entry, P_OFFSET, start)
    return out


# structure-aware passes ------------------------------------------------------------------

def _drop_sections(s: _Search) -> bool:
    """Forget the section header table and truncate what only it referred to."""
    lay = _layout(s.best)
    if lay is None or not any(s.best[f.offset:f.offset + f.size].strip(b"\0")
                              for f in SECTION_FIELDS):
        return False
    stripped = s.best
    for f in SECTION_FIELDS:
        stripped = _zeroed(stripped, f.offset, f.size)
    end = _referenced_end(stripped, lay)
    return s.keeps(stripped[:end]) or s.keeps(stripped)


def _drop_program_headers(s: _Search) -> bool:
    """Blocks of entries (halving sizes), then single entries, then any pair."""
    lay = _layout(s.best)
    if lay is None or not lay.program_headers:
        return False
    progress = False
    size = max(len(lay.program_headers) // 2, 1)
    while size >= 1:
        index = len(lay.program_headers) - size
        # from the end down, so a success leaves the indexes still to try where they were
        while index >= 0:
            lay = _layout(s.best)
            if lay is None:
                return progress
            if index + size <= len(lay.program_headers):
                drop = range(index, index + size)
                progress |= s.keeps(_without_entries(s.best, lay, drop))
            index -= size
        size //= 2
    retry = True
    while retry:
        retry = False
        lay = _layout(s.best)
        if lay is None or not 3 <= len(lay.program_headers) <= MAX_PAIR_HEADERS:
            break
        count = len(lay.program_headers)
        pairs = [(i, j) for i in reversed(range(count)) for j in reversed(range(i))]
        for pair in pairs:
            if s.keeps(_without_entries(s.best, lay, pair)):
                progress = retry = True
                break
    return progress


def _try_zero(s: _Search, offset: int, size: int) -> bool:
    piece = s.best[offset:offset + size]
    if len(piece) < size or not any(piece):
        return False
    return s.keeps(_zeroed(s.best, offset, size))


def _simplify_fields(s: _Search) -> bool:
    """Zero what the loader may ignore; p_align to 0 or else 1; p_flags bit by bit."""
    lay = _layout(s.best)
    if lay is None:
        return False
    progress = False
    for offset, size in HEADER_FIELDS:
        progress |= _try_zero(s, offset, size)
    # fields never move in this pass, so the entry offsets stay valid throughout
    for ph in lay.program_headers:
        base = lay.phdr_offset(ph.index)
        progress |= _try_zero(s, base + P_PADDR.offset, P_PADDR.size)
        progress |= _try_zero(s, base + P_OFFSET.offset, P_OFFSET.size)
        if ph.p_type != PT_LOAD:
            for field in (P_VADDR, P_FILESZ, P_MEMSZ):
                progress |= _try_zero(s, base + field.offset, field.size)
        align = P_ALIGN.read(s.best, base)
        if align > 1:
            progress |= (s.keeps(_put(s.best, base, P_ALIGN, 0))
                         or s.keeps(_put(s.best, base, P_ALIGN, 1)))
        if not _try_zero(s, base + P_FLAGS.offset, P_FLAGS.size):
            for bit in reversed(range(8 * P_FLAGS.size)):
                flags = P_FLAGS.read(s.best, base)
                if flags & (1 << bit):
                    progress |= s.keeps(_put(s.best, base, P_FLAGS, flags & ~(1 << bit)))
        else:
            progress = True
    return progress


def _cut_segment_data(s: _Search) -> bool:
    """The smallest p_filesz of each PT_LOAD that keeps the signature, by bisection."""
    lay = _layout(s.best)
    if lay is None:
        return False
    progress = False
    for ph in lay.program_headers:
        if ph.p_type != PT_LOAD or ph.filesz == 0:
            continue
        base = lay.phdr_offset(ph.index)
        if s.keeps(_put(s.best, base, P_FILESZ, 0)):
            progress = True
            continue
        low, high = 0, ph.filesz  # low does not keep the signature, high does
        while high - low > 1:
            middle = (low + high) // 2
            if s.keeps(_put(s.best, base, P_FILESZ, middle)):
                high, progress = middle, True
            else:
                low = middle
    return progress


def _close_gaps(s: _Search) -> bool:
    """Remove bytes between the ranges the headers refer to, fixing the offsets after them."""
    lay = _layout(s.best)
    # section headers point at file offsets this pass does not fix up: it waits until
    # _drop_sections got rid of them
    if lay is None or (lay.shoff and lay.shnum):
        return False
    live = _live_ranges(s.best, lay)
    gaps = [(a[1], b[0]) for a, b in zip(live, live[1:], strict=False)]
    progress = False
    # last gap first: removing one leaves the offsets of the earlier ones unchanged
    for start, stop in reversed(gaps):
        lay = _layout(s.best)
        if lay is None:
            break
        candidate = _without_gap(s.best, lay, start, stop)
        if candidate is not None:
            progress |= s.keeps(candidate)
    return progress


def _cut_tail(s: _Search) -> bool:
    """Truncate after the last referenced byte, then cut ever smaller pieces off the end."""
    progress = False
    lay = _layout(s.best)
    if lay is not None:
        end = _referenced_end(s.best, lay)
        if end < len(s.best):
            progress |= s.keeps(s.best[:end])
    size = len(s.best) // 2
    while size >= 1:
        while len(s.best) > size and s.keeps(s.best[:-size]):
            progress = True
        size //= 2
    return progress


STRUCTURE_PASSES: tuple[Callable[[_Search], bool], ...] = (
    _drop_sections, _drop_program_headers, _simplify_fields, _cut_segment_data, _close_gaps,
    _cut_tail,
)


# byte-level passes -----------------------------------------------------------------------

def _remove_chunks(s: _Search) -> bool:
    """Delta debugging by removal: chunks of halving size, each position tried once a size
    (the size is repeated while removals succeed)."""
    progress = False
    size = len(s.best) // 2
    while size >= 1:
        removed = False
        start = (len(s.best) - 1) // size * size
        # from the end down, so a removal leaves the chunks still to try where they were
        while start >= 0:
            data = s.best
            if start < len(data) and s.keeps(data[:start] + data[start + size:]):
                removed = True
            start -= size
        progress |= removed
        if not removed:
            size //= 2
    return progress


def _zero_chunks(s: _Search) -> bool:
    """Zero 8-byte words, then single bytes: nothing gets shorter, but values get simpler."""
    progress = False
    for size in (8, 1):
        for start in range(0, len(s.best), size):
            progress |= _try_zero(s, start, min(size, len(s.best) - start))
    return progress


# ------------------------------------------------------------------------------------------

def _reduce(s: _Search) -> None:
    changed = True
    while changed:
        changed = False
        for structure_pass in STRUCTURE_PASSES:
            changed |= structure_pass(s)
    _remove_chunks(s)
    _zero_chunks(s)


def minimize(data: bytes, executor: Executor, *, max_executions: int = 20_000,
             progress: Callable[[int, int], None] | None = None) -> MinimizeOutcome:
    """The smallest input found that crashes `executor` with the signature `data` crashes with.

    Raises NotACrash when `data` does not crash, and passes on a HarnessError on `data` itself;
    one on a candidate only means that candidate is not kept. `max_executions` counts boots,
    the first one of `data` included."""
    data = bytes(data)
    first = executor.run(data)
    if first.verdict != "crash" or first.signature is None or first.crash_class is None:
        why = f": {first.reject_reason}" if first.reject_reason else ""
        raise NotACrash(f"the input does not crash the kernel (verdict {first.verdict}{why})")
    search = _Search(executor, data, first, progress)
    search.limit = max(1, max_executions - min(TAIL_RESERVE, max_executions // 10))
    with contextlib.suppress(_OutOfBudget):
        _reduce(search)
    search.limit = max_executions
    with contextlib.suppress(_OutOfBudget):
        _cut_tail(search)
    if progress is not None:
        progress(search.executions, len(search.best))
    return MinimizeOutcome(
        data=search.best, original_size=len(data), size=len(search.best),
        signature=first.signature, crash_class=first.crash_class,
        executions=search.executions, result=search.best_result,
        harness_errors=search.harness_errors,
    )


# command line ----------------------------------------------------------------------------

class _UsageError(Exception):
    """A mistake in how the command was called (bad path, bad option value)."""


def add_arguments(parser: argparse.ArgumentParser, *, crash_optional: bool = False) -> None:
    """The options of `fuzzfarm minimize`, for a parser of its own or a subcommand's."""
    parser.add_argument("crash", metavar="CRASH", nargs="?" if crash_optional else None,
                        help="an input that crashes the kernel")
    parser.add_argument("--kernel", default="seed", metavar="seed|fixed|upstream|PROFILE.toml",
                        help="kernel build: a built-in profile or a profile file "
                             "(default: seed)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="where to write the minimized input (default: CRASH.min)")
    parser.add_argument("--max-executions", type=int, default=20_000, metavar="N",
                        help="boots to spend at most (default: 20000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuzzfarm minimize",
        description="Shrink a crashing input while it keeps crashing with the same signature. "
                    "Exit status: 0 done, 2 error (including an input that does not crash).")
    add_arguments(parser)
    return parser


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise _UsageError(f"{path} is a directory, not an input file") from None
    except OSError as e:
        raise _UsageError(f"cannot read {path}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    """`fuzzfarm minimize` with parsed arguments; errors print one line and give 2."""
    from kernel_emu.profile import load_profile

    crash = Path(args.crash)
    out = Path(args.output) if args.output else crash.with_name(crash.name + ".min")
    try:
        if args.max_executions < 1:
            raise _UsageError("--max-executions must be at least 1")
        data = _read(crash)
        profile = load_profile(args.kernel)
        started = time.perf_counter()
        with ProgressLine(sys.stderr) as status:
            def show(executions: int, size: int) -> None:
                status.update(f"minimize: {executions} executions, {size} bytes")

            outcome = minimize(data, Executor(profile), max_executions=args.max_executions,
                               progress=show)
        seconds = time.perf_counter() - started
        try:
            out.write_bytes(outcome.data)
        except OSError as e:
            raise _UsageError(f"cannot write {out}: {e.strerror}") from None
    except _UsageError as e:
        print(f"fuzzfarm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except NotACrash as e:
        print(f"fuzzfarm: error: {crash} on {args.kernel}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except HarnessError as e:
        print(f"fuzzfarm: harness error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{outcome.original_size} -> {outcome.size} bytes, signature: {outcome.signature}, "
          f"{outcome.executions} executions ({seconds:.1f} s)")
    print(f"wrote {out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
