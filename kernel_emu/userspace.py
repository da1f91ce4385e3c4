"""Oracle of the user address space the kernel is about to enter ring 3 with: no PT_LOAD the
user half cannot hold, each PT_LOAD mapped where and as the ELF says with the file's bytes,
no user page over kernel memory or in the upper half, no user page that no program header
covers, and an entry into ring 3 at user-executable code with a writable stack.

The page walk comes as runs of consecutive pages (a 16 MiB segment is a dozen runs, not 4096
mappings); every check finds the first page of a run it applies to, so the findings name the
same page as a page-by-page scan would.

The native judge (native/userspace.h) makes the same checks on one walk and says what each
found, which the findings below word; what it cannot follow exactly is judged here, and this
module stays the reference for what the oracle finds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kernel_emu import pagewalk
from kernel_emu.elflayout import PF_W, PF_X
from kernel_emu.image import KernelImage
from kernel_emu.klog import KernelLog
from kernel_emu.machine import PAGE, Machine
from kernel_emu.profile import TargetProfile
from kernel_emu.result import CrashClass, Finding

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the Python oracle gives the same answer, slower
    native_walker = None  # type: ignore[assignment]

USER_STACK_PAGES = 64
# a page walk under the run's final CR3: the leaf mapping a virtual address (None: not mapped)
Translate = Callable[[int], pagewalk.Mapping | None]
# the native judge's `bad`: a user page in the upper half, over a page table
BAD_UPPER, BAD_TABLE = -2, -1


def user_space_findings(m: Machine, image: KernelImage, prof: TargetProfile, log: KernelLog,
                        expected: list[dict[str, int]], frames: list[str],
                        kstack_base: int | None, file: bytes = b"",
                        segments: Sequence[tuple[int, int, int, int, int]] | None = None
                        ) -> list[Finding]:
    """Walk the page tables the kernel is about to enter ring 3 with (CR3 at the stop).
    `segments`: `expected` as (vaddr, memsz, filesz, offset, flags) tuples, when the caller
    has them. The native judge nearly always says what each check finds, and the findings
    are worded from that; anything else is judged below, findings and all."""
    kernel_phys = kernel_ranges(image, prof, kstack_base)
    if native_walker is not None:
        if segments is None:
            segments = [(s["vaddr"], s["memsz"], s["filesz"], s["offset"], s["flags"])
                        for s in expected]
        stack_top = log.user_entry[1] if log.user_entry else None
        low = m.banks[0]
        cr3 = m.reg("cr3")
        judged = native_walker.user_space_judge(
            low.buffer, low.base, cr3, m.reg("rsp"), prof.kernel.user_top,
            segments, file, [(lo, hi) for lo, hi, _ in kernel_phys],
            None if stack_top is None else (stack_top - USER_STACK_PAGES * PAGE, stack_top),
            pagewalk.MAX_LEAVES)
        if judged is not None:
            return _judged_findings(m, cr3, prof, expected, frames, kernel_phys, judged) \
                if judged else []
    return user_space_findings_python(m, prof, log, expected, frames, kernel_phys, file)


def _judged_findings(m: Machine, cr3: int, prof: TargetProfile,
                     expected: list[dict[str, int]], frames: list[str],
                     kernel_phys: list[tuple[int, int, str]],
                     judged: tuple[Any, ...]) -> list[Finding]:
    """The reference's findings, in its order, from what the native judge found: the stack
    and the entry, when it says they fail, by the reference's own check (a walk of a page
    or two)."""
    bounds, stack_ok, pages, bad, uncovered, content, entry_ok = judged

    def translate(vaddr: int) -> pagewalk.Mapping | None:
        return pagewalk.translate(m, cr3, vaddr)

    out: list[Finding] = []
    if bounds >= 0:
        out.append(_bounds_finding(bounds, expected[bounds], prof.kernel.user_top, frames))
    if not stack_ok:
        out += stack_findings(m, translate, frames)
    for i, page, rights, writable, executable in pages:
        out.append(_rights_finding(i, expected[i], page, writable, executable, frames)
                   if rights else _unmapped_finding(i, expected[i], page, frames))
    if bad is not None:
        vaddr, paddr, what = bad
        name = None if what == BAD_UPPER else \
            "a page table of this address space" if what == BAD_TABLE else kernel_phys[what][2]
        out.insert(int(bounds >= 0), BadMapping(vaddr, paddr, name).finding(frames))
    if uncovered is not None:
        out.append(_uncovered_finding(uncovered, frames))
    if content is not None:
        i, at, got, want = content
        out.append(_content_finding(i, expected[i], at, got, want, frames))
    if not entry_ok:
        out += entry_findings(m, translate, frames)
    return out


def kernel_ranges(image: KernelImage, prof: TargetProfile,
                  kstack_base: int | None) -> list[tuple[int, int, str]]:
    """Physical memory no user page may map: (start, end, what it is)."""
    kernel_phys = [(image.start, image.end, "kernel image"),
                   (prof.heap.base, prof.heap.end, "kernel heap"),
                   (0, 0x10_0000, "firmware memory"),
                   (prof.memory.ramdisk_base, prof.memory.ramdisk_base + prof.memory.ramdisk_size,
                    "the ramdisk")]
    if kstack_base:
        kernel_phys.append((kstack_base - PAGE, kstack_base + prof.kernel.stack_size,
                            "kernel stack"))
    return kernel_phys


def user_space_findings_python(m: Machine, prof: TargetProfile, log: KernelLog,
                               expected: list[dict[str, int]], frames: list[str],
                               kernel_phys: list[tuple[int, int, str]],
                               file: bytes = b"") -> list[Finding]:
    """The whole oracle in Python: the reference, and the judge of anything to report."""
    cr3 = m.reg("cr3")
    tables: set[int] = set()
    runs = pagewalk.walk_user(m, cr3, tables, runs=True)
    translate = _translator(m, cr3, runs)
    out: list[Finding] = []
    # a segment the user half cannot hold, which the kernel went on to map: the cause of
    # whatever its pages then look like
    for i, seg in enumerate(expected):
        if seg["memsz"] and seg["vaddr"] + seg["memsz"] > prof.kernel.user_top:
            out.append(_bounds_finding(i, seg, prof.kernel.user_top, frames))
            break
    # the kernel's own mapping, the user stack, before what the file asked for: a stack
    # mapped to the wrong place also shows as a segment page it took, or a page nobody asked
    # for, and is the cause of both
    out += stack_findings(m, translate, frames)
    covered: list[tuple[int, int]] = []
    page_flags = shared_page_flags(expected)
    for i, seg in enumerate(expected):
        if seg["memsz"] == 0:
            continue
        first = seg["vaddr"] & ~(PAGE - 1)
        last = (seg["vaddr"] + seg["memsz"] - 1) & ~(PAGE - 1)
        if last < first or last - first > (1 << 32):
            continue
        covered.append((first, last))
        for page in (first, last):
            mp = translate(page)
            if mp is None or not mp.user:
                out.append(_unmapped_finding(i, seg, page, frames))
                break
            # a page two segments share carries the rights of both
            flags = page_flags.get(page, 0)
            if mp.writable != bool(flags & PF_W) or mp.executable != bool(flags & PF_X):
                out.append(_rights_finding(i, seg, page, mp.writable, mp.executable, frames))
                break
    stack_top = log.user_entry[1] if log.user_entry else None
    bad = first_bad_mapping(runs, prof.kernel.user_top, kernel_phys, sorted(tables))
    if bad is not None:
        # the most specific evidence first: a user page over kernel memory (a missing bound)
        # explains the segment pages it takes the place of
        out.insert(sum(f.field == "segments.bounds" for f in out), bad.finding(frames))
    if not any(f.cls == CrashClass.VADDR_CORRUPTION for f in out):
        merged = merge_pages(covered)
        stack = None if stack_top is None else (stack_top - USER_STACK_PAGES * PAGE, stack_top)
        for run in runs:
            vaddr = first_uncovered(run, merged, stack, prof.kernel.user_top)
            if vaddr is not None:
                out.append(_uncovered_finding(vaddr, frames))
                break
    if file and not out:
        out += content_findings(m, translate, expected, file, frames)
    out += entry_findings(m, translate, frames)
    return out


def _bounds_finding(i: int, seg: dict[str, int], user_top: int,
                    frames: list[str]) -> Finding:
    return Finding(CrashClass.KERNEL_MAPPING,
                   [f"segment {i}: the ELF asks for {seg['vaddr']:#x}+{seg['memsz']:#x}, past "
                    f"the user half (which ends at {user_top:#x}), and the kernel entered "
                    f"ring 3 with it"], frames=frames, field="segments.bounds")


def _unmapped_finding(i: int, seg: dict[str, int], page: int, frames: list[str]) -> Finding:
    return Finding(CrashClass.VADDR_CORRUPTION,
                   [f"segment {i}: ELF says vaddr {seg['vaddr']:#x}, but page {page:#x} is not "
                    f"mapped for user mode"], frames=frames, field=f"segments[{i}].vaddr")


def _rights_finding(i: int, seg: dict[str, int], page: int, writable: bool, executable: bool,
                    frames: list[str]) -> Finding:
    perms = ("W" if writable else "-") + ("X" if executable else "-")
    return Finding(CrashClass.VADDR_CORRUPTION,
                   [f"segment {i}: ELF flags {seg['flags']:#x}, page {page:#x} mapped {perms}"],
                   frames=frames, field=f"segments[{i}].flags")


def _uncovered_finding(vaddr: int, frames: list[str]) -> Finding:
    return Finding(CrashClass.VADDR_CORRUPTION,
                   [f"user page {vaddr:#x} is mapped but no program header covers it"],
                   frames=frames, field="segments.extra")


def _content_finding(i: int, seg: dict[str, int], at: int, got: int, want: int,
                     frames: list[str]) -> Finding:
    """Byte `at` of segment `i` (from its start) reads `got` where the file, or the BSS,
    says `want`."""
    source = f"file offset {seg['offset'] + at:#x}" if at < seg["filesz"] else "the BSS"
    return Finding(CrashClass.VADDR_CORRUPTION,
                   [f"segment {i}: user memory at {seg['vaddr'] + at:#x} reads {got:#04x}, "
                    f"{source} says {want:#04x}"], frames=frames, field=f"segments[{i}].data")


# bytes compared at each end of a segment's file data, and at the start of its BSS
CONTENT_WINDOW = 64
# a segment whose windows lie within this many bytes from its start is read once for all three
WHOLE_READ = 2 * PAGE


def content_findings(m: Machine, translate: Translate, expected: list[dict[str, int]],
                     file: bytes, frames: list[str]) -> list[Finding]:
    """Each segment's first and last bytes from the file, and the first bytes of its BSS,
    must read in user memory as the file has them (and zero). Segments whose address ranges
    overlap another's are left out: the ELF does not say which one wins."""
    shared = overlapping([(s["vaddr"], s["vaddr"] + s["memsz"]) for s in expected])
    for i, seg in enumerate(expected):
        vaddr, memsz, filesz, offset = seg["vaddr"], seg["memsz"], seg["filesz"], seg["offset"]
        if not memsz or filesz > memsz or offset + filesz > len(file) \
                or vaddr + memsz > 1 << 64 or shared[i]:
            continue
        w = CONTENT_WINDOW
        bss = min(w, memsz - filesz)
        windows = [(0, file[offset:offset + min(w, filesz)]),
                   (max(0, filesz - w), file[offset + max(0, filesz - w):offset + filesz]),
                   (filesz, bytes(bss))]
        # a small segment's windows are read in one go (each read walks its pages again);
        # where any page of them is not mapped, each window is read apart, as before
        span = filesz + bss
        whole = _read_user(m, translate, vaddr, span) if span <= WHOLE_READ else None
        for at, want in windows:
            got = whole[at:at + len(want)] if whole is not None else \
                _read_user(m, translate, vaddr + at, len(want))
            if got is not None and got != want:
                k = next(k for k in range(len(want)) if got[k] != want[k])
                return [_content_finding(i, seg, at + k, got[k], want[k], frames)]
    return []


def overlapping(spans: list[tuple[int, int]]) -> list[bool]:
    """For each non-empty half-open span, whether another span meets it (lo_j < hi_i and
    lo_i < hi_j; an empty span meets what it lies strictly inside). Of the spans that start
    before hi_i, those that end by lo_i are the ones that do not meet it, and span i is among
    the first: sorted bounds make it n log n, where a table of hundreds made a pairwise test
    the largest cost of the oracle."""
    los, his = sorted(lo for lo, _ in spans), sorted(hi for _, hi in spans)
    return [lo < hi and bisect.bisect_left(los, hi) - bisect.bisect_right(his, lo) > 1
            for lo, hi in spans]


def _translator(m: Machine, cr3: int, runs: list[pagewalk.Mapping]) -> Translate:
    """`pagewalk.translate` under `cr3`. A page user mode can reach is read off `runs` (the
    walk of `walk_user`, in ascending virtual order), which holds the same leaf with the same
    rights; any other page is walked. Each page is looked up once: the oracles below ask for
    the same few pages several times a run."""
    starts = [r.vaddr for r in runs]
    walked: dict[int, pagewalk.Mapping | None] = {}

    def translate(vaddr: int) -> pagewalk.Mapping | None:
        page = vaddr >> 12
        if page in walked:
            return walked[page]
        i = bisect.bisect_right(starts, vaddr) - 1
        run = runs[i] if i >= 0 else None
        if run is not None and vaddr < run.end:
            mp: pagewalk.Mapping | None = run if run.count == 1 else \
                run.leaf((vaddr - run.vaddr) // run.size)
        else:
            mp = pagewalk.translate(m, cr3, vaddr)
        walked[page] = mp
        return mp

    return translate


def _read_user(m: Machine, translate: Translate, vaddr: int, size: int) -> bytes | None:
    """`size` bytes of user memory at `vaddr` through the page tables (None: not mapped)."""
    out = bytearray()
    while size > 0:
        mp = translate(vaddr)
        if mp is None:
            return None
        chunk = min(size, mp.vaddr + mp.size - vaddr)
        paddr = mp.paddr + (vaddr - mp.vaddr)
        if m.bank_for(paddr, chunk) is None:
            return None
        out += m.read(paddr, chunk)
        vaddr, size = vaddr + chunk, size - chunk
    return bytes(out)


class BadMapping(NamedTuple):
    vaddr: int
    paddr: int
    what: str | None  # None: in the upper half

    def finding(self, frames: list[str]) -> Finding:
        if self.what is None:
            return Finding(CrashClass.KERNEL_MAPPING,
                           [f"user page {self.vaddr:#x} is mapped in the upper (kernel) half "
                            f"of the address space"], frames=frames, field="mapping.upper")
        return Finding(CrashClass.KERNEL_MAPPING,
                       [f"user page {self.vaddr:#x} maps physical {self.paddr:#x}, which is "
                        f"{self.what}"], frames=frames, field="mapping.kernel")


def first_bad_mapping(runs: list[pagewalk.Mapping], user_top: int,
                      kernel_phys: list[tuple[int, int, str]],
                      tables: list[int]) -> BadMapping | None:
    """The first leaf, in walk order, that lies in the upper half or maps kernel memory or
    a page table of this address space (`tables`: sorted)."""
    for run in runs:
        size, n = run.size, run.count
        # leaves by physical order: leaf j maps [low + j*size, +size); walk order is the same
        # or, for a descending run, the reverse
        low = run.paddr - (n - 1) * size if run.descending else run.paddr
        high = low + n * size
        # nearly always none of them: only ranges that meet the run are looked at closely
        spans = [overlap(low, size, n, lo, hi) for lo, hi, _ in kernel_phys
                 if lo < high and low < hi]
        t = bisect.bisect_left(tables, low)
        if t < len(tables) and tables[t] < high:
            inside = tables[t:bisect.bisect_left(tables, high)]
            spans.append(((inside[0] - low) // size, (inside[-1] - low) // size))
        firsts = [n - 1 - span[1] if run.descending else span[0] for span in spans if span]
        if run.end > user_top:
            k = max(0, -(-(user_top - run.vaddr) // size))  # ceiling division
            if k < n:
                firsts.append(k)
        if not firsts:
            continue
        leaf = run.leaf(min(firsts))
        if leaf.vaddr >= user_top:
            return BadMapping(leaf.vaddr, leaf.paddr, None)
        what = next((name for lo, hi, name in kernel_phys
                     if lo < leaf.paddr + size and leaf.paddr < hi),
                    "a page table of this address space")
        return BadMapping(leaf.vaddr, leaf.paddr, what)
    return None


def overlap(low: int, size: int, n: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The first and last j < n for which [low + j*size, +size) overlaps [lo, hi)."""
    first = 0 if low + size > lo else (lo - low - size) // size + 1
    last = min(n - 1, -(-(hi - low) // size) - 1)
    return (first, last) if first <= last else None


def first_uncovered(run: pagewalk.Mapping, merged: list[tuple[int, int]],
                    stack: tuple[int, int] | None, user_top: int) -> int | None:
    """The first leaf address of `run` below `user_top` that no program header covers and
    that is not near the user stack; each step jumps past a covered span."""
    size, vaddr = run.size, run.vaddr
    while vaddr < run.end and vaddr < user_top:
        i = bisect.bisect_right(merged, (vaddr, 1 << 65)) - 1
        if i >= 0 and merged[i][0] <= vaddr <= merged[i][1]:
            past = merged[i][1]
        elif stack is not None and stack[0] <= vaddr <= stack[1]:
            past = stack[1]
        else:
            return vaddr
        vaddr += (past - vaddr) // size * size + size  # the first leaf after `past`
    return None


def shared_page_flags(expected: list[dict[str, int]]) -> dict[int, int]:
    """For the first and last page of every segment: the union of the p_flags of all segments
    with bytes in that page. Linear in the segments plus the pages they share."""
    spans = sorted((s["vaddr"], s["vaddr"] + s["memsz"], s["flags"]) for s in expected
                   if s["memsz"] and s["vaddr"] + s["memsz"] <= 1 << 64)
    pages = sorted({p for lo, hi, _ in spans for p in (lo & ~(PAGE - 1), (hi - 1) & ~(PAGE - 1))})
    flags = dict.fromkeys(pages, 0)
    for lo, hi, f in spans:
        i = bisect.bisect_left(pages, lo & ~(PAGE - 1))
        while i < len(pages) and pages[i] < hi:
            flags[pages[i]] |= f
            i += 1
    return flags


def merge_pages(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive page ranges, sorted and merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + PAGE:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def entry_findings(m: Machine, translate: Translate, frames: list[str]) -> list[Finding]:
    """The `iretq` about to run must enter ring 3 at user-executable code."""
    rsp = m.reg("rsp")
    rip, cs = m.u64(rsp), m.u64(rsp + 8)
    if cs & 3 != 3:
        return [Finding(CrashClass.BAD_ENTRY, [f"iretq does not enter ring 3 (CS={cs:#x})"],
                        frames=frames, field="entry.ring")]
    mp = translate(rip)
    if mp is None or not mp.user or not mp.executable:
        state = "not mapped" if mp is None else ("not user-accessible" if not mp.user
                                                 else "not executable")
        return [Finding(CrashClass.BAD_ENTRY, [f"ring 3 entered at {rip:#x}, which is {state}"],
                        frames=frames, field="entry.rip")]
    return []


def stack_findings(m: Machine, translate: Translate, frames: list[str]) -> list[Finding]:
    """The stack the kernel set up for ring 3 must be mapped user-writable where the `iretq`
    about to run puts the stack pointer."""
    rsp = m.reg("rsp")
    if m.u64(rsp + 8) & 3 != 3:
        return []  # not into ring 3: entry_findings says so
    # the program's first push goes just below its stack pointer
    user_rsp = m.u64(rsp + 24)
    mp = translate((user_rsp - 8) & ((1 << 64) - 1))
    if mp is None or not mp.user or not mp.writable:
        state = "not mapped" if mp is None else ("not user-accessible" if not mp.user
                                                 else "not writable")
        return [Finding(CrashClass.BAD_ENTRY,
                        [f"ring 3 entered with its stack at {user_rsp:#x}, whose page is "
                         f"{state}"], frames=frames, field="entry.rsp")]
    return []
