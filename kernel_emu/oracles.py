"""Oracles: turn what was observed during a run into findings and a Result.

The first anomaly in execution order is the primary finding. Anomalies seen while the guest
ran (an allocation overlapping a live one, a free of a pointer that is not live) keep their
order; state found damaged after the stop (heap walk, segment table, user page tables)
happened before the stop, so it is placed before the terminal event (fault, panic, hang).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

import capstone

from kernel_emu import heapwalk, pagewalk
from kernel_emu.elfview import Segment
from kernel_emu.klog import KernelLog, parse_log
from kernel_emu.machine import PAGE
from kernel_emu.result import Finding, Result

if TYPE_CHECKING:
    from kernel_emu.executor import Executor
    from kernel_emu.image import KernelImage

VECTORS = {0: "#DE divide error", 6: "#UD invalid opcode", 13: "#GP general protection",
           14: "#PF page fault", 8: "#DF double fault", 3: "#BP breakpoint", 4: "#OF overflow",
           5: "#BR bound range", 12: "#SS stack fault", 17: "#AC alignment check"}
OOM_MARKERS = ("memory allocation of", "out of physical pages", "out of memory")
USER_STACK_PAGES = 64
PF_X, PF_W = 1, 2

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True


# ------------------------------------------------------------------------------------------
# backtraces

def backtrace(ex: Executor, *, limit: int = 24) -> list[str]:
    """Symbolized frames where the guest stopped, by the frame-pointer chain."""
    m, image = ex.m, ex.image
    pc, rbp = m.reg("rip"), m.reg("rbp")
    frames = [image.describe(pc)]
    seen = set()
    while len(frames) < limit and rbp and rbp not in seen and m.bank_for(rbp, 16):
        seen.add(rbp)
        ret = m.u64(rbp + 8)
        if not any(lo <= ret < hi for lo, hi in image.text_ranges):
            break
        frames.append(image.describe(ret, return_address=True))
        next_rbp = m.u64(rbp)
        if next_rbp <= rbp:
            break
        rbp = next_rbp
    return frames


# ------------------------------------------------------------------------------------------
# heap

def _free_list_head(ex: Executor) -> int:
    return ex.m.u64(ex.free_list_addr)


def _heap_initialised(log: KernelLog) -> bool:
    return "[heap] init" in log.text


# ------------------------------------------------------------------------------------------
# faults

def _access_kind(ex: Executor, pc: int, cr2: int) -> str:
    code = ex.m.read(pc, 16)
    insn = next(_md.disasm(code, pc, 1), None)
    if insn is None or pc <= cr2 < pc + max(insn.size, 1):
        return "instruction fetch"
    mnem = insn.mnemonic
    if any(s in mnem for s in ("movs", "stos", "cmps", "scas", "lods")):
        rdi, rsi = ex.m.reg("rdi"), ex.m.reg("rsi")
        if "stos" in mnem or ("movs" in mnem and abs(cr2 - rdi) < abs(cr2 - rsi)):
            return "write"
        return "read"
    try:
        for op in insn.operands:
            if op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                return "write"
    except capstone.CsError:
        pass
    if mnem.startswith(("push", "call")):
        return "write"
    return "read"


def _where(ex: Executor, addr: int) -> str:
    label = ex.m.label_of(addr)
    return f"{addr:#x} [{label}]" if label else f"{addr:#x} [unmapped]"


def _fault_finding(ex: Executor, kstack_base: int | None, frames: list[str]) -> Finding:
    fault = ex.obs.fault
    assert fault is not None
    image = ex.image
    where = image.describe(fault.pc)
    if fault.vector == -1:
        return Finding("cpu-fault", [f"{ex.obs.uc_error} at {where}"], frames=frames,
                       pc=fault.pc)
    name = VECTORS.get(fault.vector, f"exception {fault.vector}")
    if fault.vector == 14:
        access = _access_kind(ex, fault.pc, fault.cr2)
        guard = None
        if ex.m.label_of(fault.cr2) == "guard:firmware-stack":
            guard = "firmware stack"
        elif kstack_base and kstack_base - PAGE <= fault.cr2 < kstack_base:
            guard = "kernel stack"
        if guard is not None:
            return Finding("stack-overflow",
                           [f"{access} of the {guard} guard page at {fault.cr2:#x} "
                            f"(rsp={fault.rsp:#x}) at {where}"], frames=frames, pc=fault.pc)
        return Finding("cpu-fault", [f"{name}: {access} of {_where(ex, fault.cr2)} at {where}"],
                       frames=frames, pc=fault.pc)
    return Finding("cpu-fault", [f"{name} at {where}"], frames=frames, pc=fault.pc)


def spinning_in(image: KernelImage, blocks: list[int]) -> tuple[str | None, str]:
    """The function most of a hang's recent blocks are in (the first seen of a tie; None
    without blocks) and the lowest eight distinct block addresses."""
    # a loop is a few blocks over and over: each distinct one is looked up once, in order of
    # first appearance
    times = Counter(blocks)
    funcs: Counter[str] = Counter()
    for block, n in times.items():
        funcs[image.describe(block).rsplit("+0x", 1)[0]] += n
    spot = funcs.most_common(1)[0][0] if funcs else None
    return spot, ", ".join(sorted(f"{b:#x}" for b in times)[:8])


def _hang_finding(ex: Executor, frames: list[str]) -> Finding:
    spot, loop = spinning_in(ex.image, ex.tracer.recent_blocks())
    if spot is None:
        spot = ex.image.describe(ex.m.reg("rip"))
    if ex.stalled_at:
        why = (f"no progress: stopped by the watchdog after {ex.stalled_at} instructions of "
               f"this run outside the bulk memory routines")
    else:
        why = f"instruction budget of {ex.budget} spent"
    return Finding("hang", [f"{why}; spinning in {spot} (blocks {loop})"], frames=frames,
                   pc=ex.m.reg("rip"))


def _panic_finding(ex: Executor, log: KernelLog, frames: list[str]) -> Finding:
    msg = log.panic or ""
    cls = "out-of-memory" if any(k in msg for k in OOM_MARKERS) else "kernel-panic"
    where = f" at {log.panic_location}" if log.panic_location else ""
    return Finding(cls, [f"kernel panic: {msg}{where}"], frames=frames,
                   pc=ex.m.reg("rip"), field=log.panic_location)


# ------------------------------------------------------------------------------------------
# what was loaded versus what the ELF says

def _expected(segments: tuple[Segment, ...]) -> list[dict[str, int]]:
    return [s.to_json() for s in segments]


def _segment_findings(ex: Executor, log: KernelLog, expected: list[dict[str, int]],
                      frames: list[str], cut_short: bool = False) -> list[Finding]:
    """`cut_short`: the run was stopped (budget or watchdog), so a segment table still being
    printed is unfinished, not short."""
    if log.segment_count is None:
        return []
    out: list[Finding] = []
    unfinished = cut_short and len(log.segments) < log.segment_count
    if log.segment_count != len(expected) or (
            len(log.segments) != len(expected) and not unfinished):
        out.append(Finding("vaddr-corruption",
                           [f"the ELF has {len(expected)} PT_LOAD segments, the kernel loaded "
                            f"{len(log.segments)} (said count={log.segment_count})"],
                           frames=frames, field="segments.count"))
    for i, (want, got) in enumerate(zip(expected, log.segments, strict=False)):
        for key in ("vaddr", "memsz", "filesz", "offset", "flags"):
            if want[key] != got[key]:
                out.append(Finding("vaddr-corruption",
                                   [f"segment {i}: ELF says {key} {want[key]:#x}, "
                                    f"kernel loaded {key} {got[key]:#x}"],
                                   frames=frames, field=f"segments[{i}].{key}"))
                break
    return out


def _user_space_findings(ex: Executor, log: KernelLog,
                         expected: list[dict[str, int]], frames: list[str],
                         kstack_base: int | None) -> list[Finding]:
    """Walk the page tables the kernel is about to enter ring 3 with. The walk comes as runs
    of consecutive pages (a 16 MiB segment is a dozen runs, not 4096 mappings); every check below
    finds the first page of a run it applies to, so the findings name the same page as a
    page-by-page scan would."""
    m, prof = ex.m, ex.profile
    cr3 = m.reg("cr3")
    tables: set[int] = set()
    runs = pagewalk.walk_user(m, cr3, tables, runs=True)
    small = [r for r in runs if r.size == PAGE]
    starts = [r.vaddr for r in small]

    def user_page(page: int) -> pagewalk.Mapping | None:
        i = bisect.bisect_right(starts, page) - 1
        if i >= 0 and page < small[i].end:
            return small[i]  # only its rights are read, the same for every page of the run
        return pagewalk.translate(m, cr3, page)

    out: list[Finding] = []
    covered: list[tuple[int, int]] = []
    page_flags = _shared_page_flags(expected)
    for i, seg in enumerate(expected):
        if seg["memsz"] == 0:
            continue
        first = seg["vaddr"] & ~(PAGE - 1)
        last = (seg["vaddr"] + seg["memsz"] - 1) & ~(PAGE - 1)
        if last < first or last - first > (1 << 32):
            continue
        covered.append((first, last))
        for page in (first, last):
            mp = user_page(page)
            if mp is None or not mp.user:
                out.append(Finding("vaddr-corruption",
                                   [f"segment {i}: ELF says vaddr {seg['vaddr']:#x}, but page "
                                    f"{page:#x} is not mapped for user mode"],
                                   frames=frames, field=f"segments[{i}].vaddr"))
                break
            # a page two segments share carries the rights of both
            flags = page_flags.get(page, 0)
            if mp.writable != bool(flags & PF_W) or mp.executable != bool(flags & PF_X):
                perms = ("W" if mp.writable else "-") + ("X" if mp.executable else "-")
                out.append(Finding("vaddr-corruption",
                                   [f"segment {i}: ELF flags {seg['flags']:#x}, page {page:#x} "
                                    f"mapped {perms}"], frames=frames,
                                   field=f"segments[{i}].flags"))
                break
    stack_top = log.user_entry[1] if log.user_entry else None
    kernel_phys = [(ex.image.start, ex.image.end, "kernel image"),
                   (prof.heap.base, prof.heap.end, "kernel heap"),
                   (0, 0x10_0000, "firmware memory"),
                   (prof.memory.ramdisk_base, prof.memory.ramdisk_base + prof.memory.ramdisk_size,
                    "the ramdisk")]
    if kstack_base:
        kernel_phys.append((kstack_base - PAGE, kstack_base + prof.kernel.stack_size,
                            "kernel stack"))
    bad = _first_bad_mapping(runs, prof.kernel.user_top, kernel_phys, sorted(tables))
    if bad is not None:
        out.append(bad.finding(frames))
    if not any(f.cls == "vaddr-corruption" for f in out):
        merged = _merge(covered)
        stack = None if stack_top is None else (stack_top - USER_STACK_PAGES * PAGE, stack_top)
        for run in runs:
            vaddr = _first_uncovered(run, merged, stack, prof.kernel.user_top)
            if vaddr is not None:
                out.append(Finding("vaddr-corruption",
                                   [f"user page {vaddr:#x} is mapped but no program header "
                                    f"covers it"], frames=frames, field="segments.extra"))
                break
    out += _entry_findings(ex, cr3, frames)
    return out


class _BadMapping(NamedTuple):
    vaddr: int
    paddr: int
    what: str | None  # None: in the upper half

    def finding(self, frames: list[str]) -> Finding:
        if self.what is None:
            return Finding("kernel-mapping",
                           [f"user page {self.vaddr:#x} is mapped in the upper (kernel) half "
                            f"of the address space"], frames=frames, field="mapping.upper")
        return Finding("kernel-mapping",
                       [f"user page {self.vaddr:#x} maps physical {self.paddr:#x}, which is "
                        f"{self.what}"], frames=frames, field="mapping.kernel")


def _first_bad_mapping(runs: list[pagewalk.Mapping], user_top: int,
                       kernel_phys: list[tuple[int, int, str]],
                       tables: list[int]) -> _BadMapping | None:
    """The first leaf, in walk order, that lies in the upper half or maps kernel memory or
    a page table of this address space (`tables`: sorted)."""
    for run in runs:
        size, n = run.size, run.count
        # leaves by physical order: leaf j maps [low + j*size, +size); walk order is the same
        # or, for a descending run, the reverse
        low = run.paddr - (n - 1) * size if run.descending else run.paddr
        high = low + n * size
        # nearly always none of them: only ranges that meet the run are looked at closely
        spans = [_overlap(low, size, n, lo, hi) for lo, hi, _ in kernel_phys
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
            return _BadMapping(leaf.vaddr, leaf.paddr, None)
        what = next((name for lo, hi, name in kernel_phys
                     if lo < leaf.paddr + size and leaf.paddr < hi),
                    "a page table of this address space")
        return _BadMapping(leaf.vaddr, leaf.paddr, what)
    return None


def _overlap(low: int, size: int, n: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The first and last j < n for which [low + j*size, +size) overlaps [lo, hi)."""
    first = 0 if low + size > lo else (lo - low - size) // size + 1
    last = min(n - 1, -(-(hi - low) // size) - 1)
    return (first, last) if first <= last else None


def _first_uncovered(run: pagewalk.Mapping, merged: list[tuple[int, int]],
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


def _shared_page_flags(expected: list[dict[str, int]]) -> dict[int, int]:
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


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive page ranges, sorted and merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + PAGE:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _entry_findings(ex: Executor, cr3: int, frames: list[str]) -> list[Finding]:
    m = ex.m
    rsp = m.reg("rsp")
    rip, cs = m.u64(rsp), m.u64(rsp + 8)
    if cs & 3 != 3:
        return [Finding("bad-entry", [f"iretq does not enter ring 3 (CS={cs:#x})"],
                        frames=frames, field="entry.ring")]
    mp = pagewalk.translate(m, cr3, rip)
    if mp is None or not mp.user or not mp.executable:
        state = "not mapped" if mp is None else ("not user-accessible" if not mp.user
                                                 else "not executable")
        return [Finding("bad-entry", [f"ring 3 entered at {rip:#x}, which is {state}"],
                        frames=frames, field="entry.rip")]
    return []


# ------------------------------------------------------------------------------------------

def assess(ex: Executor, segments: tuple[Segment, ...], stop: str,
           instructions: int) -> Result:
    """The Result of the run that just ended; `segments`: the input's PT_LOAD entries."""
    m, obs = ex.m, ex.obs
    text = ex.console().decode("utf-8", errors="replace")
    log = parse_log(text)
    expected = _expected(segments)
    frames = backtrace(ex)
    kstack_base = ex.kernel_stack_base() or None
    terminal: Finding | None = None
    if stop in ("fault", "uc-error"):
        terminal = _fault_finding(ex, kstack_base, frames)
    elif stop == "budget":
        terminal = _hang_finding(ex, frames)
    elif stop == "halt" and log.panic is not None:
        terminal = _panic_finding(ex, log, frames)
    elif stop == "halt" and log.rejected is None:
        terminal = Finding("kernel-panic", ["the kernel halted without a panic message or a "
                                            "rejection"], frames=frames, pc=m.reg("rip"))
    elif stop == "efi-return":
        terminal = Finding("kernel-panic", [f"efi_main returned to the firmware with status "
                                            f"{ex.fw.state.efi_main_status:#x}"],
                           frames=frames, pc=m.reg("rip"))
    state: list[Finding] = []
    blocks: list[heapwalk.Block] = []
    if _heap_initialised(log):
        heap = heapwalk.walk_heap(m, ex.profile.heap, _free_list_head(ex))
        blocks = heap.blocks
        if heap.problems:
            fld, evidence = heap.problems[0]
            state.append(Finding("heap-corruption", [evidence], frames=frames, field=fld))
    if log.rejected is None:
        state += _segment_findings(ex, log, expected, frames, cut_short=stop == "budget")
    if stop == "until":
        state += _user_space_findings(ex, log, expected, frames, kstack_base)
    findings = _dedupe(obs.events + state + ([terminal] if terminal else []))
    primary = findings[0] if findings else None
    if primary is not None:
        verdict = "crash"
    elif log.rejected is not None:
        verdict = "rejected"
    else:
        verdict = "ok"
    hs = ex.profile.heap.header_size
    return Result(
        verdict=verdict,
        crash_class=primary.cls if primary else None,
        signature=primary.signature() if primary else None,
        findings=findings,
        pc=m.reg("rip"),
        symbol=ex.image.describe(m.reg("rip")),
        backtrace=frames,
        segments=log.segments,
        expected_segments=expected,
        log=text,
        instructions=instructions,
        stop=stop,
        reject_reason=log.rejected,
        registers=m.registers(),
        console=list(ex.fw.state.console),
        kernel=ex.profile.name,
        kernel_sha256=ex.image.sha256,
        heap_blocks=[b.to_json(hs) for b in blocks[:256]],
        ports=[{"access": kind, "port": port, "size": size, "value": value}
               for kind, port, size, value in ex.port_accesses()],
    )


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str | None]] = set()
    out = []
    for f in findings:
        key = (f.cls, f.field)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
