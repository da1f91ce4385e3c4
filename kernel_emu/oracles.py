"""Oracles: pure functions from one run's observations (kernel_emu/observations.py), the kernel
image and its profile to findings and a Result.

The first anomaly in execution order is the primary finding. Anomalies seen while the guest
ran (a write past an allocation, caught at the next allocator call; an allocation overlapping
a live one; a free of a pointer that is not live) keep their order; state found damaged after
the stop (heap walk, segment table, user page tables) happened before the stop, so it is
placed before the terminal event (fault, panic, hang).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import capstone

from kernel_emu import heapwalk
from kernel_emu.allocations import HEAP, Allocation, event_frames
from kernel_emu.elfview import Segment
from kernel_emu.image import KernelImage
from kernel_emu.klog import KernelLog, parse_log
from kernel_emu.leaks import leak_findings
from kernel_emu.machine import PAGE, Machine
from kernel_emu.observations import RunObservations
from kernel_emu.profile import TargetProfile
from kernel_emu.result import HEADER_FIELDS, CrashClass, Finding, Result, StopReason, Verdict
from kernel_emu.userspace import user_space_findings

VECTORS = {0: "#DE divide error", 6: "#UD invalid opcode", 13: "#GP general protection",
           14: "#PF page fault", 8: "#DF double fault", 3: "#BP breakpoint", 4: "#OF overflow",
           5: "#BR bound range", 12: "#SS stack fault", 17: "#AC alignment check"}
OOM_MARKERS = ("memory allocation of", "out of physical pages", "out of memory")
# A stack that overflows reaches its guard page through the stack pointer: a push or a call
# writes just below rsp, and a function touches its frame above it (a frame of more than this
# is not looked for). Any other access to a guard page is a stray one (a copy from a wild
# source address, say), filed as the page fault it is.
STACK_BELOW_RSP = 256
STACK_FRAME_MAX = 64 * 1024

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True


# ------------------------------------------------------------------------------------------
# backtraces

def backtrace(m: Machine, image: KernelImage, *, limit: int = 24,
              registers: dict[str, int] | None = None) -> list[str]:
    """Symbolized frames where the guest stopped, by the frame-pointer chain (`registers`:
    the machine's, when the caller has read them already)."""
    if registers is None:
        pc, rbp = m.reg("rip"), m.reg("rbp")
    else:
        pc, rbp = registers["rip"], registers["rbp"]
    frames = [image.describe(pc)]
    seen = set()
    layout = image.frame_layout(pc)
    text = image.text_ranges
    while len(frames) < limit and layout and rbp and rbp not in seen:
        saved_at, ret_at = layout
        ret, next_rbp = m.u64_in_ram(rbp + ret_at), m.u64_in_ram(rbp + saved_at)
        if ret is None or next_rbp is None:
            break
        seen.add(rbp)
        for lo, hi in text:
            if lo <= ret < hi:
                break
        else:
            break
        frames.append(image.describe(ret, return_address=True))
        layout = image.frame_layout(ret - 1)
        if next_rbp <= rbp:
            break
        rbp = next_rbp
    return frames


# ------------------------------------------------------------------------------------------
# heap

def _free_list_head(m: Machine, image: KernelImage, profile: TargetProfile) -> int:
    return m.u64(image.symbol(profile.heap.free_list_symbol).address)


def kernel_stack_base(m: Machine, image: KernelImage, profile: TargetProfile) -> int:
    """The base of the kernel's own stack, as its stack-base variable says (0: not yet set)."""
    return m.u64(image.symbol(profile.kernel.stack_base_symbol).address)


def _heap_initialised(log: KernelLog) -> bool:
    return "[heap] init" in log.text


# ------------------------------------------------------------------------------------------
# faults

def _access_kind(m: Machine, pc: int, cr2: int) -> str:
    code = m.read(pc, 16)
    insn = next(_md.disasm(code, pc, 1), None)
    if insn is None or pc <= cr2 < pc + max(insn.size, 1):
        return "instruction fetch"
    mnem = insn.mnemonic
    if any(s in mnem for s in ("movs", "stos", "cmps", "scas", "lods")):
        rdi, rsi = m.reg("rdi"), m.reg("rsi")
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


def _where(m: Machine, addr: int) -> str:
    label = m.label_of(addr)
    return f"{addr:#x} [{label}]" if label else f"{addr:#x} [unmapped]"


def _fault_finding(obs: RunObservations, image: KernelImage, kstack_base: int | None,
                   frames: list[str]) -> Finding:
    fault, m = obs.fault, obs.machine
    assert fault is not None
    where = image.describe(fault.pc)
    if fault.vector == -1:
        return Finding(CrashClass.CPU_FAULT, [f"{obs.uc_error} at {where}"], frames=frames,
                       pc=fault.pc)
    name = VECTORS.get(fault.vector, f"exception {fault.vector}")
    if fault.vector == 14:
        access = _access_kind(m, fault.pc, fault.cr2)
        guard = None
        if m.label_of(fault.cr2) == "guard:firmware-stack":
            guard = "firmware stack"
        elif kstack_base and kstack_base - PAGE <= fault.cr2 < kstack_base:
            guard = "kernel stack"
        if guard is not None and \
                fault.rsp - STACK_BELOW_RSP <= fault.cr2 < fault.rsp + STACK_FRAME_MAX:
            return Finding(CrashClass.STACK_OVERFLOW,
                           [f"{access} of the {guard} guard page at {fault.cr2:#x} "
                            f"(rsp={fault.rsp:#x}) at {where}"], frames=frames, pc=fault.pc)
        return Finding(CrashClass.CPU_FAULT,
                       [f"{name}: {access} of {_where(m, fault.cr2)} at {where}"],
                       frames=frames, pc=fault.pc)
    return Finding(CrashClass.CPU_FAULT, [f"{name} at {where}"], frames=frames, pc=fault.pc)


def spinning_in(image: KernelImage, blocks: list[int]) -> tuple[str | None, str]:
    """The function most of a hang's recent blocks are in (the first seen of a tie; None
    without blocks) and the lowest eight distinct block addresses."""
    return _spinning_in(*_loop_functions(image, blocks))


# What a hang's recent blocks say, by image and blocks: the function it spins in, its lowest
# blocks (as `spinning_in` gives them) and the functions it runs in. A fuzzer meets the same
# loop run after run (a mature campaign's hangs were a fifth of its runs), and reading the
# blocks again cost ~75 µs a time.
_LOOPS: dict[tuple[KernelImage, tuple[int, ...]], tuple[str | None, str, frozenset[str]]] = {}
LOOPS_KEPT = 4096


def _loop(image: KernelImage, blocks: list[int]) -> tuple[str | None, str, frozenset[str]]:
    key = (image, tuple(blocks))
    said = _LOOPS.get(key)
    if said is None:
        if len(_LOOPS) >= LOOPS_KEPT:
            _LOOPS.clear()
        funcs, times = _loop_functions(image, blocks)
        said = _LOOPS[key] = (*_spinning_in(funcs, times), frozenset(funcs))
    return said


def _spinning_in(funcs: Counter[str], times: Counter[int]) -> tuple[str | None, str]:
    spot = funcs.most_common(1)[0][0] if funcs else None
    return spot, ", ".join(sorted(f"{b:#x}" for b in times)[:8])


def _loop_functions(image: KernelImage, blocks: list[int]) -> tuple[Counter[str], Counter[int]]:
    # a loop is a few blocks over and over: each distinct one is looked up once, in order of
    # first appearance
    times = Counter(blocks)
    funcs: Counter[str] = Counter()
    for block, n in times.items():
        funcs[image.describe(block).rsplit("+0x", 1)[0]] += n
    return funcs, times


def _loop_frames(funcs: Collection[str], frames: list[str]) -> list[str]:
    """The backtrace from the outermost function the loop runs in (`funcs`: the functions
    of its blocks): the loop's owner, which the backtrace shows wherever in the loop the run
    was stopped (a callee it calls each time round is on the stack only some of the time)."""
    names = [f.rsplit("+0x", 1)[0] for f in frames]
    owner = max((i for i, name in enumerate(names) if name in funcs), default=None)
    return frames[owner:] if owner is not None else frames


def _hang_finding(obs: RunObservations, image: KernelImage, frames: list[str]) -> Finding:
    rip = obs.machine.reg("rip")
    spot, loop, funcs = _loop(image, obs.recent_blocks())
    if spot is None:
        spot = image.describe(rip)
    if obs.stalled_at:
        why = (f"no progress: stopped by the watchdog after {obs.stalled_at} instructions of "
               f"this run outside the bulk memory routines")
    else:
        why = f"instruction budget of {obs.budget} spent"
    return Finding(CrashClass.HANG, [f"{why}; spinning in {spot} (blocks {loop})"],
                   frames=_loop_frames(funcs, frames), pc=rip)


def _panic_finding(m: Machine, log: KernelLog, frames: list[str]) -> Finding:
    msg = log.panic or ""
    cls = (CrashClass.OUT_OF_MEMORY if any(k in msg for k in OOM_MARKERS)
           else CrashClass.KERNEL_PANIC)
    where = f" at {log.panic_location}" if log.panic_location else ""
    return Finding(cls, [f"kernel panic: {msg}{where}"], frames=frames,
                   pc=m.reg("rip"), field=log.panic_location)


# ------------------------------------------------------------------------------------------
# what was loaded versus what the ELF says

def _expected(segments: tuple[Segment, ...]) -> list[dict[str, int]]:
    # Segment.to_json, inline: an input may have hundreds of PT_LOAD entries
    return [{"vaddr": vaddr, "memsz": memsz, "filesz": filesz, "offset": offset, "flags": flags}
            for vaddr, memsz, filesz, offset, flags in segments]


# the site of what the printed segment table shows wrong: one place, wherever the run stopped
SEGMENT_TABLE = "segment table"
# the site of heap damage no allocation of the run can be charged to
HEAP_WALK = HEAP


SEGMENT_KEYS = ("vaddr", "memsz", "filesz", "offset", "flags")
# an entry wrong in this many of them was not loaded from its program header (read from the
# wrong place, or written over); fewer are as many wrong fields, each a bug of its own
MISREAD_FIELDS = 3


def _segment_findings(log: KernelLog, expected: list[dict[str, int]],
                      frames: list[str], cut_short: bool = False) -> list[Finding]:
    """What the printed segment table shows wrong. A table whose entries are not the ELF's
    (another count, or an entry wrong in MISREAD_FIELDS fields or more: program headers
    misread, or written over) is first of all one finding, field `segments`, whatever shape
    that took;
    then each wrong entry's first wrong field, as consequences. `cut_short`: the run was
    stopped (budget or watchdog), so a segment table still being printed is unfinished, not
    short."""
    if log.segment_count is None:
        return []
    unfinished = cut_short and len(log.segments) < log.segment_count
    evidence: list[str] = []
    if log.segment_count != len(expected) or (
            len(log.segments) != len(expected) and not unfinished):
        evidence.append(f"the ELF has {len(expected)} PT_LOAD segments, the kernel loaded "
                        f"{len(log.segments)} (said count={log.segment_count})")
    wrong = []  # (index, the fields that differ)
    for i, (want, got) in enumerate(zip(expected, log.segments, strict=False)):
        if want == got:  # nearly always: the fields are compared one by one only when not
            continue
        keys = [key for key in SEGMENT_KEYS if want[key] != got[key]]
        if keys:
            wrong.append((i, keys))
    misread = next(((i, keys) for i, keys in wrong if len(keys) >= MISREAD_FIELDS), None)
    out: list[Finding] = []
    if evidence or misread is not None:
        if misread is not None:
            i, keys = misread
            evidence.append(f"segment {i} is wrong in {len(keys)} fields: ELF says " + ", ".join(
                f"{key} {expected[i][key]:#x}" for key in keys) + "; kernel loaded " + ", ".join(
                f"{key} {log.segments[i][key]:#x}" for key in keys))
        out.append(Finding(CrashClass.VADDR_CORRUPTION, evidence, frames=frames,
                           field="segments", site=SEGMENT_TABLE))
    return out + [Finding(CrashClass.VADDR_CORRUPTION,
                          [f"segment {i}: ELF says {keys[0]} {expected[i][keys[0]]:#x}, "
                           f"kernel loaded {keys[0]} {log.segments[i][keys[0]]:#x}"],
                          frames=frames, field=f"segments[{i}].{keys[0]}", site=SEGMENT_TABLE)
                  for i, keys in wrong]


# ------------------------------------------------------------------------------------------

def assess(obs: RunObservations, image: KernelImage, profile: TargetProfile,
           segments: tuple[Segment, ...], details: bool = True) -> Result:
    """The Result of the run `obs` describes; `segments`: the input's PT_LOAD entries.
    Without `details`, a Result with nothing to report leaves out what only shows it (its
    backtrace and heap blocks): a fuzzing job keeps nothing of such a run but its verdict."""
    m, stop = obs.machine, obs.stop
    text = obs.console.decode("utf-8", errors="replace")
    log = parse_log(text, obs.log_base)
    expected = _expected(segments)
    registers = m.registers()  # one read for all the oracles below
    pc = registers["rip"]
    # a stop that is a finding by itself takes the backtrace at once; a settled kernel's (in
    # ring 3's doorway, or halted refusing the input) only once something is found in it,
    # below: this list, which the findings made meanwhile hold, is filled in then
    settled = stop == StopReason.UNTIL or (
        stop == StopReason.HALT and log.panic is None and log.rejected is not None)
    frames = [] if settled else backtrace(m, image, registers=registers)
    kstack_base = kernel_stack_base(m, image, profile) or None
    terminal: Finding | None = None
    if stop in (StopReason.FAULT, StopReason.UC_ERROR):
        terminal = _fault_finding(obs, image, kstack_base, frames)
    elif stop == StopReason.BUDGET:
        terminal = _hang_finding(obs, image, frames)
    elif stop == StopReason.HALT and log.panic is not None:
        terminal = _panic_finding(m, log, frames)
    elif stop == StopReason.HALT and log.rejected is None:
        terminal = Finding(CrashClass.KERNEL_PANIC,
                           ["the kernel halted without a panic message or a rejection"],
                           frames=frames, pc=pc)
    elif stop == StopReason.EFI_RETURN:
        terminal = Finding(CrashClass.KERNEL_PANIC,
                           [f"efi_main returned to the firmware with status "
                            f"{obs.efi_main_status:#x}"], frames=frames, pc=pc)
    state: list[Finding] = []
    blocks: list[heapwalk.Block] = []
    if _heap_initialised(log):
        heap = heapwalk.walk_heap(m, profile.heap, _free_list_head(m, image, profile))
        blocks = heap.blocks
        if heap.problems:
            fld, evidence = heap.problems[0]
            lines, where = [evidence], frames
            # the damage is charged to the allocation it lies in or right after (as a heap
            # overflow report names the overflowed block), wherever the run then stopped
            # (only from a whole log of the allocator's calls)
            culprit = None if obs.events_dropped else \
                _culprit(obs.live, heap.spot, profile.heap.header_size, obs.freed)
            if culprit is not None and culprit.returned is not None:
                where = event_frames(culprit.returned,
                                     lambda a, ret: image.describe(a, return_address=ret))
                how = "in allocation" if culprit not in obs.live else \
                    "in or right after allocation"
                gone = ", freed since," if culprit not in obs.live else ""
                lines.append(f"{how} #{culprit.seq} ({culprit.size:#x} bytes at "
                             f"{culprit.ptr:#x}){gone} from " + " < ".join(where[1:5]))
            writer = obs.writers.get(heap.damaged[0]) if heap.damaged else None
            if writer:
                lines.append(f"last written by {' < '.join(writer[:4])}")
            # no block of this run to charge it to: the heap itself, not the stop, names it
            state.append(Finding(CrashClass.HEAP_CORRUPTION, lines, frames=where, field=fld,
                                 site=None if where is not frames else HEAP_WALK))
    # a table the kernel printed is compared even if it then refused to map it: a corrupted
    # table is often what makes it refuse
    state += _segment_findings(log, expected, frames, cut_short=stop == StopReason.BUDGET)
    if stop == StopReason.UNTIL:
        state += user_space_findings(m, image, profile, log, expected, frames, kstack_base,
                                     obs.file, segments)
    if (stop == StopReason.UNTIL or (stop == StopReason.HALT and log.rejected is not None)) \
            and not obs.events_dropped:
        # a settled kernel: everything the run allocated is freed or still in use (known only
        # from a whole log of the allocator's calls: what the log missed is not live). Entering
        # user mode abandons the kernel stack (the next entry starts at its top), so only a
        # halted kernel's stack is a root
        stack = (kstack_base, kstack_base + profile.kernel.stack_size) \
            if kstack_base and stop == StopReason.HALT else None
        state += leak_findings(m, image, obs.live, stack,
                               lambda a, ret: image.describe(a, return_address=ret),
                               registers)
    findings = _dedupe(obs.events + state + ([terminal] if terminal else []))
    if settled and (findings or details):
        frames += backtrace(m, image, registers=registers)
    primary = findings[0] if findings else None
    if primary is not None:
        verdict = Verdict.CRASH
    elif log.rejected is not None:
        verdict = Verdict.REJECTED
    else:
        verdict = Verdict.OK
    hs = profile.heap.header_size
    return Result(
        verdict=verdict,
        crash_class=primary.cls if primary else None,
        signature=primary.signature() if primary else None,
        findings=findings,
        pc=pc,
        symbol=image.describe(pc),
        backtrace=frames,
        segments=log.segments,
        expected_segments=expected,
        log=text,
        instructions=obs.instructions,
        stop=stop,
        reject_reason=log.rejected,
        registers=registers,
        console=list(obs.firmware_console),
        kernel=profile.name,
        kernel_sha256=image.sha256,
        kernel_load_base=image.load_base,
        heap_blocks=[b.to_json(hs) for b in blocks[:256]] if details or primary else [],
        ports=[{"access": kind, "port": port, "size": size, "value": value}
               for kind, port, size, value in obs.ports],
    )


def _culprit(live: Sequence[Allocation], spot: int | None, header: int,
             freed: Sequence[Allocation] = ()) -> Allocation | None:
    """The allocation of this run whose block holds `spot` or ends right before it: the
    last live one whose header starts before `spot`, if `spot` lies within its payload plus
    the next header and the remainder a first-fit allocator leaves unsplit (a few headers'
    worth); unless `spot` lies past that one's payload and inside the payload of an
    allocation freed since (the last freed, and none live over it): the block is free again,
    and the object that lived there is what it was damaged through."""
    if spot is None:
        return None
    best: Allocation | None = None
    for a in live:
        end = a.ptr + ((max(a.size, 1) + 7) & ~7) + 5 * header
        if a.ptr - header < spot <= end and (best is None or a.ptr > best.ptr):
            best = a
    if best is not None and best.ptr <= spot < best.ptr + max(best.size, 1):
        return best  # inside a live payload
    for a in reversed(freed):
        if a.ptr <= spot < a.ptr + max(a.size, 1) and not any(
                b.ptr <= spot < b.ptr + max(b.size, 1) for b in live):
            return a
    return best


def heap_damage(obs: RunObservations, image: KernelImage, profile: TargetProfile,
                result: Result) -> tuple[int, int] | None:
    """The header field (address, size) a heap walk found damaged after this run, when the
    result has such a finding: a run made again watching it names who wrote it."""
    if not any(f.cls == CrashClass.HEAP_CORRUPTION and f.field in HEADER_FIELDS
               for f in result.findings):
        return None
    heap = heapwalk.walk_heap(obs.machine, profile.heap,
                              _free_list_head(obs.machine, image, profile))
    return heap.damaged


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str | None]] = set()
    out = []
    for f in findings:
        key = (f.cls, f.field)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
