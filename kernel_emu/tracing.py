"""Per-run guest tracing: instruction budget, edge coverage, recent blocks, dirty pages, ports.

The fuzzing loop restores a snapshot between runs, so it needs to know, cheaply, what the
guest did during one run:

* how many instructions it executed, with a hard budget that stops a hang exactly;
* AFL-style edge coverage, to steer the fuzzer;
* the last blocks it executed, to say where a hang spins;
* which RAM pages it wrote, so the restore copies only those (unless attached with
  ``track_writes=False``, see :func:`attach_tracer`);
* optionally, what it wrote to its debug console and which service it requested (port I/O,
  see :class:`PortConfig`), without a Python callback per byte;
* optionally, registers and a frame-pointer backtrace each time it reaches one of a few
  watched addresses (see :meth:`GuestTracer.watch`), without a Python callback per hit.

Two implementations share the :class:`GuestTracer` interface.  The native one registers
C callbacks from the ``kernel_emu._tracer`` extension directly with Unicorn (about a
nanosecond per event); the pure-Python fallback uses ordinary ``Uc.hook_add`` callbacks
(hundreds of nanoseconds per event) and exists for machines where the extension is not
built.  Both give identical results for the same run, which the tests check.

Address semantics (measured on Unicorn 2.1.4):

* ``UC_HOOK_MEM_WRITE`` reports the guest-PHYSICAL address of the first byte written,
  also with paging on.  Regions are therefore physical RAM ranges, and a user mapping of
  a physical page at some other virtual address is tracked correctly.
* A store that crosses a page boundary is reported once, with the physical address of its
  first byte and its full size.  Without paging the tail lies on the next physical page
  and is marked exactly.  With paging the tail lies on whatever physical page the next
  virtual page maps to, which the hook cannot see.  The tracker then marks the adjacent
  physical page anyway and adds the entry ``(OUTSIDE, UNKNOWN_PAGE)`` to the dirty set.
* Writes outside every region are reported as ``(OUTSIDE, physical_page_number)``.
* Host writes (``uc.mem_write``) are never reported.
* The CPU's page-table walker sets the Accessed and Dirty bits of page-table entries by
  writing guest memory directly, and Unicorn reports none of those writes.  Callers that
  restore only dirty pages must make sure such updates cannot matter: for instance by
  setting A (and D on writable leaves) in every entry of the snapshot's page tables, or by
  always restoring page-table pages.

The rule for callers is therefore: any entry whose region index is :data:`OUTSIDE` means
the dirty set does not describe every changed byte, and the run must be followed by a full
restore.  Correctness never depends on the guest's write pattern being benign.

Instruction counting counts instruction *starts* as reported by ``UC_HOOK_CODE``: an
instruction that faults and is restarted counts twice, and a ``rep``-prefixed string
instruction counts once per iteration plus once for the final check (``rep stosq`` with
``rcx = n`` counts ``n + 1``).  The budget stops the guest before it starts instruction
number ``budget + 1``, so after a stop ``instructions == budget`` and RIP points at the
instruction that did not run.

Edge coverage: each block start address ``a`` is hashed to ``cur = (a * K mod 2**64) >> 48``
with ``K = 0x9E3779B97F4A7C15``; the counter ``map[cur ^ prev]`` is incremented and
``prev = cur >> 1`` (``prev`` is 0 after reset).  Counters SATURATE at 255, so a hot edge
never wraps back to "not hit".

Port I/O (only with ``ports``): an OUT to the service port stops the guest right after the
OUT, with RIP at the next instruction, which has not run and is not counted.  Unicorn may
announce that instruction to the code hook before it honours the stop (measured: it does when
the OUT is not the last instruction of its translation block and the tracer's code hook is
the only one), so the tracer ignores one announcement, and stops waiting for it when the next
block starts.  The always-installed code hook is also what makes the stop exact: without one,
Unicorn would run on to the end of the translation block.  Resuming from RIP
starts a new block there, which adds an entry to the recent blocks and an edge to the
coverage that an uninterrupted run would not have: both tracers agree on that too.

Watches (see :meth:`GuestTracer.watch`) are served by the tracer's own code hook rather than
by extra ``UC_HOOK_CODE`` hooks: each registered code hook slows down every instruction, hit
or not (about 1.3 ns each, measured), on top of its Python callback's cost per hit.  The
native hook tests each address against the range of the watched ones and, inside it, against
a 4096-bit filter on the low 12 address bits before comparing exactly.  Measured with
``python -m kernel_emu.native.bench_tracer``: no watches, or watches away from the running
code, cost nothing measurable; instructions between watched addresses about 0.5 ns more; the
few whose low 12 bits equal a watched address's about 2.5 ns; an event about 80 ns.

An event is recorded for an instruction that is about to run and is counted: one that the
budget or a service stop keeps from running gives no event, and gives its event when the
guest resumes there.  Like the count, an instruction that faults and is restarted gives a
second event.

Two services exist to make runs cheaper without changing what they observe.  Bulk sites
(:meth:`GuestTracer.fast_forward`, native only): the ``rep stosq``/``rep movsq`` of the
guest's memory routines are performed on RAM directly where that is provably the same,
counted one instruction per iteration as the guest would have been.  Cycle stops
(:meth:`GuestTracer.stop_at`, :meth:`GuestTracer.quiet_resume`, :meth:`GuestTracer.skip`):
what ``kernel_emu.cycles`` needs to prove that a run repeats and to account for repetitions
it does not run.

Guest memory for the backtrace is read with ``uc_mem_read``, which takes guest-PHYSICAL
addresses also with paging on (measured on Unicorn 2.1.4), so the frames are right only where
the stack is identity-mapped, as the kernel's is; elsewhere they are read from the physical
page with the same number.  ``uc_vmem_read`` would translate, but its page walk sets
Accessed bits in the guest's page tables, a write no hook reports, which would make the dirty
set silently incomplete.
"""

from __future__ import annotations

import ctypes
import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from unicorn.unicorn_const import UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_MEM_WRITE
from unicorn.unicorn_py3.unicorn import Uc, UcError, uclib
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_R8,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

from kernel_emu import redzones
from kernel_emu.peload import FrameLayouts
from kernel_emu.redzones import Arguments, GuardHit, Redzones

try:
    from kernel_emu import _tracer as native_tracer
except ImportError:  # not built: attach_tracer falls back to Python hooks
    native_tracer = None  # type: ignore[assignment]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
RING_SIZE = 64
MAP_SIZE = 65536
COVERAGE_MULTIPLIER = 0x9E3779B97F4A7C15
NO_BUDGET = (1 << 64) - 1
OUTSIDE = -1
UNKNOWN_PAGE = -1
CONSOLE_CAP = 1 << 20
PORT_LOG_SIZE = 64
WATCH_MAX = 32
EVENT_CAP = 4096
MAX_FRAMES = 16

_CR0_PG = 1 << 31
_MASK64 = (1 << 64) - 1
_SYSTEM_V = FrameLayouts()  # no unwind tables: the System V chain
# Registers a watch event records, in WatchEvent field order (after address, instructions).
_WATCH_REGS = (
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
    UC_X86_REG_RBP,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RSI,
    UC_X86_REG_RDX,
    UC_X86_REG_RCX,
    UC_X86_REG_R8,
)
# Attribute on the Uc object that owns the native states: hooks hold raw pointers to them,
# so they must live exactly as long as the engine that may call those hooks.
_KEEPALIVE_ATTR = "_kernel_emu_tracer_states"


@dataclass(frozen=True)
class PortConfig:
    """Which I/O ports the tracer serves itself (see :func:`attach_tracer`).

    * OUT to ``console``: the low byte is appended to :meth:`GuestTracer.console`.
    * OUT to ``service``: the 32-bit value becomes the pending request returned by
      :meth:`GuestTracer.take_service` and the guest stops right after the OUT.
    * OUT to any other port: logged in :meth:`GuestTracer.port_log`.
    * IN from ``console``: ``console_read_value``, truncated to the access size (a Bochs-style
      port 0xE9 reads back 0xE9, which guests use to detect the console).
    * IN from any other port: all ones for the access size (nothing answers, the bus floats
      high), logged in :meth:`GuestTracer.port_log`.
    """

    console: int = 0xE9
    service: int = 0xF0
    console_read_value: int = 0xE9

    def __post_init__(self) -> None:
        for name in ("console", "service"):
            port = getattr(self, name)
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"{name} port {port:#x} is not a 16-bit port number")
        if self.console == self.service:
            raise ValueError("the console and service ports must differ")
        if not 0 <= self.console_read_value <= 0xFFFF_FFFF:
            raise ValueError("console_read_value must fit in 32 bits")


class BulkSite(NamedTuple):
    """A ``rep stosq`` (kind ``"stosq"``) or ``rep movsq`` (``"movsq"``) instruction of the
    guest's memory routines, or a ``rep outsb`` (``"outsb"``: fast-forwarded only when it
    writes to the console port), that the native tracer may fast-forward (see
    :meth:`GuestTracer.fast_forward`)."""

    address: int
    kind: str


BULK_KINDS = ("stosq", "movsq", "outsb")


class WatchEvent(NamedTuple):
    """The guest was about to run the instruction at a watched ``address``.

    ``instructions`` is :attr:`GuestTracer.instructions` at that moment: the instructions
    that ran before this one since reset, so events order exactly against other counts (a
    run with budget ``n`` records the events with ``instructions < n``).  The registers are
    their values before the instruction runs; ``rip == address``.

    ``frames`` holds up to :data:`MAX_FRAMES` return addresses: first the qword at ``[rsp]``
    (watched addresses are function entries or ``ret`` instructions, where the caller's
    return address is on top of the stack), then ``[rbp + 8]`` for each frame of the
    frame-pointer chain, following ``rbp = [rbp]`` while ``rbp`` is non-zero, 8-aligned and
    strictly increasing.  The walk stops at the first address it cannot read (an empty tuple
    if ``[rsp]`` is unreadable); memory is read at guest-PHYSICAL addresses (see the module
    doc).
    """

    address: int
    instructions: int
    rip: int
    rsp: int
    rbp: int
    rax: int
    rdi: int
    rsi: int
    rdx: int
    rcx: int
    r8: int
    frames: tuple[int, ...]


@runtime_checkable
class GuestTracer(Protocol):
    """What a run of the guest did, gathered by hooks on one Unicorn engine.

    Call :meth:`reset` before each run.  All results describe the guest's activity since
    the last reset (dirty pages and watch events: since the last take or reset).  None of the
    methods may be called while ``emu_start`` is running in another thread.
    """

    native: bool
    """True when the callbacks are C functions, False for the slow Python fallback."""

    identity_cr3: int
    """CR3 of page tables the caller vouches map every tracked page virtual = physical (0:
    none). A page-crossing store made while CR3 holds it marks the next physical page and is
    counted in :attr:`identity_crossings` instead of making the dirty set incomplete; the
    caller must treat the set as incomplete if those tables themselves were written."""

    @property
    def identity_crossings(self) -> int:
        """Page-crossing stores since reset resolved through :attr:`identity_cr3`."""
        ...

    def reset(self, budget: int) -> None:
        """Zero counters, coverage, recent blocks, dirty sets, port results and watch events.

        The guest is stopped (``uc_emu_stop``) before it starts instruction number
        ``budget + 1``; pass :data:`NO_BUDGET` for no limit.  The watched addresses are kept.
        """
        ...

    @property
    def instructions(self) -> int:
        """Guest instructions started since reset (see the module doc for rep/faults)."""
        ...

    @property
    def budget_exhausted(self) -> bool:
        """True if the budget stopped the guest since reset."""
        ...

    def extend(self, budget: int, limit: int | None = None) -> None:
        """Raise the budget (counted since reset, not below :attr:`instructions`) and clear
        :attr:`budget_exhausted`: resuming the guest then continues the same run exactly.

        With a ``limit`` (not below ``budget``) the stop floats: bulk-move iterations
        performed natively from now on (:meth:`fast_forward`) do not count towards it, each
        moves it on by one, and it never passes ``limit``, which the moves themselves stop
        at exactly. Without one, the stop is exact in every instruction."""
        ...

    def take_dirty(self) -> list[tuple[int, int]]:
        """Return and forget the pages the GUEST wrote since the last take or reset.

        Entries are ``(region_index, page_index_within_region)``, sorted.  Entries with
        region index :data:`OUTSIDE` mean the set is incomplete and a full restore is
        needed: ``(OUTSIDE, n)`` is a write to physical page ``n`` outside every region,
        ``(OUTSIDE, UNKNOWN_PAGE)`` a write whose physical pages could not all be named.
        Raises ``RuntimeError`` if the tracer was attached with ``track_writes=False``.
        """
        ...

    def recent_blocks(self) -> list[int]:
        """Start addresses of the last 64 executed blocks, oldest first."""
        ...

    def coverage(self) -> memoryview:
        """The 65536 saturating 8-bit edge counters (read-only view; zero if disabled)."""
        ...

    def coverage_lines(self) -> bytes | None:
        """A bitmap of the coverage map's 64-byte lines (bit i of byte i // 8: line i)
        outside which every counter is zero, so that a reader need not go through all 64 KiB;
        None: any line may hold hits."""
        ...

    def console(self) -> bytes:
        """Bytes the guest wrote to the console port since reset (at most :data:`CONSOLE_CAP`).

        Always empty when the tracer was attached without ``ports``.
        """
        ...

    @property
    def console_dropped(self) -> int:
        """Console bytes since reset that did not fit in the :data:`CONSOLE_CAP` buffer."""
        ...

    def trust_zeros(self, pages: bytes | None) -> None:
        """From the next reset on, let a fast-forwarded zero fill leave alone the first
        bank's ``pages`` (a bitmap, bit i of byte i // 8: page i; ``None``: none), which the
        snapshot has as zeros and only the guest writes, while their leaves in the
        :attr:`identity_cr3` tables have Dirty clear (nothing stored to them since the
        restore), until a boot service runs.  The Dirty bits speak for the run only if the
        dirty-page log vouches for it afterwards: when :attr:`zeros_taken` is not 0 and it
        does not, the owner must run the input again with ``None``."""
        ...

    @property
    def zeros_taken(self) -> int:
        """Pages that zero fills left alone on the Dirty bits' word since reset."""
        ...

    @property
    def pages_left_absent(self) -> int:
        """Pages that zero fills left alone since reset, on the Dirty bits' word or on the
        host's (it held none there, or its zero page)."""
        ...

    def take_left_absent(self) -> list[bytes | None]:
        """Per RAM bank given to :meth:`fast_forward`, the pages that fast-forwarded zero
        fills left to the host since the last take (they read as zeros already), as a bitmap
        (bit i of byte i // 8: page i; ``None``: none); the snapshot restore gives them back
        to the host again rather than clearing them."""
        ...

    def take_service(self) -> int | None:
        """Return and clear the pending service request (the value OUT to the service port).

        ``None`` when there is none.  A request means the guest stopped right after its
        OUT: the caller performs the service, sets the guest's registers and resumes
        ``emu_start`` from RIP.
        """
        ...

    def port_log(self) -> list[tuple[str, int, int, int]]:
        """The first :data:`PORT_LOG_SIZE` accesses to other ports since reset, in order.

        Entries are ``(kind, port, size, value)``: kind ``"out"`` with the value written or
        ``"in"`` with the value returned (all ones).  Console accesses and service OUTs are
        not logged; an IN from the service port is logged like any other IN.
        """
        ...

    def unwind(self, entries: Sequence[tuple[int, int, int, int]]) -> None:
        """Walk the frames of watch events by these function layouts from now on:
        ``(start, end, saved_rbp, ret)`` per function, sorted and disjoint, where the caller's
        rbp and the return address lie relative to the function's rbp (code with the
        Microsoft x64 frame layout, see :func:`kernel_emu.peload.unwind_entries`).  An empty
        sequence: the System V chain.  Raises ``ValueError`` for unsorted or overlapping
        entries."""
        ...

    def watch(self, addresses: Sequence[int]) -> None:
        """Replace the set of watched instruction addresses (at most :data:`WATCH_MAX`).

        Each time the guest is about to run an instruction at a watched address, a
        :class:`WatchEvent` is recorded and the guest goes on: nothing stops it and, with the
        native tracer, no Python code runs.  Duplicates count once; an empty sequence stops
        watching.  The set survives :meth:`reset`.  Raises ``ValueError`` for more than
        :data:`WATCH_MAX` distinct addresses or one outside ``[0, 2**64)``.
        """
        ...

    def guard(self, width: int, sites: Sequence[tuple[int, int]], args: Arguments) -> None:
        """Keep redzones of ``width`` bytes (0: none) around the allocations made through the
        allocator ``sites``, ``(address, role)`` with the roles of
        :mod:`kernel_emu.redzones`, each one watched; ``args``: the registers the calls take
        their arguments in. Kept across :meth:`reset`, which forgets the allocations and
        hits."""
        ...

    def check_guards(self) -> None:
        """Compare the redzones now, as a call into the allocator does (nothing if the run
        stopped inside the allocator)."""
        ...

    def take_guard_hits(self) -> list[GuardHit]:
        """Return and forget the redzone hits since the last take or reset (at most
        :data:`kernel_emu.redzones.HITS_MAX`)."""
        ...

    def fast_forward(self, sites: Sequence[BulkSite],
                     ram: Sequence[tuple[int, int, int, bool]]) -> None:
        """Fast-forward the bulk ``sites`` from now on (an empty sequence: never).

        ``ram`` lists the guest RAM as ``(physical base, size, host address, absent_zero)``
        (absent_zero: private anonymous memory, whose pages the host does not hold read as
        zeros; a long zero fill leaves those pages alone).  The native
        tracer performs, at the site, the iterations it can prove equivalent on the RAM
        directly (see ``kernel_emu/native/bulk.h``): registers, memory, page-table
        Accessed/Dirty bits, :attr:`instructions` (one per iteration, as if the guest had run
        them), budget stops, recent blocks, coverage and dirty pages come out as without it;
        memory hooks do not see those accesses.  The Python tracer runs the sites normally.
        A watched address is never fast-forwarded.
        """
        ...

    @property
    def fast_units(self) -> int:
        """Iterations of bulk moves fast-forwarded since reset (always 0 for the Python
        tracer)."""
        ...

    @property
    def console_units(self) -> int:
        """Console bytes of ``rep outsb`` sites put in one step since reset (always 0 for the
        Python tracer)."""
        ...

    @property
    def copies_left_absent(self) -> int:
        """Pages bulk copies left to the host since reset: zeros onto pages it holds none of
        (always 0 for the Python tracer)."""
        ...

    def stop_at(self, address: int | None, nth: int = 1) -> None:
        """Stop the guest before its ``nth`` next arrival at ``address``, as a budget stop
        would (:attr:`budget_exhausted` and :attr:`stop_hit` set, the instruction neither run
        nor counted nor watched); one-shot; ``None`` cancels.  Resume with :meth:`extend`.
        The instruction the guest is stopped at, if any, is not an arrival."""
        ...

    @property
    def stop_hit(self) -> bool:
        """True when the last stop was :meth:`stop_at`'s (cleared by the next ``stop_at``)."""
        ...

    def quiet_resume(self) -> None:
        """Leave the next block entry out of the recent blocks and the coverage: the block a
        resume starts at the stopped instruction, which an uninterrupted run does not have."""
        ...

    def end_run(self) -> None:
        """The run is over and the machine's memory about to be put back (a snapshot
        restore): what the tracer set up for this run only is let go first."""
        ...

    @property
    def blocks(self) -> int:
        """Block entries recorded since reset."""
        ...

    @property
    def event_count(self) -> int:
        """Watch events recorded or dropped since reset, taken or not."""
        ...

    def skip(self, instructions: int, blocks: int, periods: int, before: bytes,
             after: bytes) -> None:
        """Account for ``periods`` more repetitions of a stretch of the run that repeats
        exactly (same machine state at both ends): ``instructions`` and ``blocks`` in all,
        each repetition adding ``after - before`` to the coverage counters (saturating).  The
        recent blocks are those ``blocks`` entries later in the same periodic sequence, so the
        last :data:`RING_SIZE` entries must already lie in it."""
        ...

    def take_events(self) -> list[WatchEvent]:
        """Return and forget the watch events recorded since the last take or reset, in order.

        At most :data:`EVENT_CAP` events wait to be taken; later ones are counted in
        :attr:`events_dropped` instead.
        """
        ...

    @property
    def events_dropped(self) -> int:
        """Watch events since reset that did not fit in the :data:`EVENT_CAP` buffer."""
        ...

    def detach(self) -> None:
        """Remove the hooks; the tracer keeps its last results but records nothing more."""
        ...


def _check_regions(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    checked = [(int(base), int(size)) for base, size in regions]
    for base, size in checked:
        if size <= 0 or base < 0 or (base | size) & (PAGE_SIZE - 1) or base + size > 1 << 64:
            raise ValueError(f"region ({base:#x}, {size:#x}) must be non-empty and page-aligned")
    ordered = sorted(checked)
    for (a_base, a_size), (b_base, _) in zip(ordered, ordered[1:], strict=False):
        if a_base + a_size > b_base:
            raise ValueError(f"regions at {a_base:#x} and {b_base:#x} overlap")
    return checked


def _check_budget(budget: int) -> int:
    if not 0 <= budget <= NO_BUDGET:
        raise ValueError(f"budget must be in [0, 2**64 - 1], got {budget}")
    return budget


def _check_watch(addresses: Sequence[int]) -> tuple[int, ...]:
    checked = sorted({operator.index(address) for address in addresses})
    if len(checked) > WATCH_MAX:
        raise ValueError(f"at most {WATCH_MAX} watched addresses, got {len(checked)}")
    if checked and (checked[0] < 0 or checked[-1] > _MASK64):
        raise ValueError("watched addresses must be in [0, 2**64)")
    return tuple(checked)


def _check_tracking(track_writes: bool) -> None:
    # an empty list would read as "nothing written" and make a partial restore silently wrong
    if not track_writes:
        raise RuntimeError("the tracer was attached with track_writes=False")


def function_address(function: Any) -> int:
    address = ctypes.cast(function, ctypes.c_void_p).value
    if not address:
        raise RuntimeError("cannot resolve a Unicorn entry point")
    return address


def add_native_hook(uc: Uc, hook_type: int, callback: int, state_address: int, *extra: Any) -> int:
    handle = ctypes.c_size_t()
    status = uclib.uc_hook_add(
        uc._uch,
        ctypes.byref(handle),
        hook_type,
        ctypes.c_void_p(callback),
        ctypes.c_void_p(state_address),
        ctypes.c_uint64(1),  # begin > end: every address
        ctypes.c_uint64(0),
        *extra,  # uc_hook_add is variadic: UC_HOOK_INSN takes the instruction id as an int
    )
    if status != 0:
        raise UcError(status)
    return handle.value


def _check_unwind(entries: Sequence[tuple[int, int, int, int]]) -> FrameLayouts:
    table = tuple(entries)
    for i, (start, end, _rbp, _ret) in enumerate(table):
        if start >= end or (i and start < table[i - 1][1]):
            raise ValueError("unwind entries must be sorted, non-empty, not overlapping")
    return FrameLayouts(table)


def _walk_frames(uc: Uc, rsp: int, rbp: int,
                 layouts: FrameLayouts = _SYSTEM_V) -> tuple[int, ...]:
    """The Python twin of the native walk_frames: see :class:`WatchEvent`."""
    try:
        frames = [int.from_bytes(uc.mem_read(rsp, 8), "little")]
    except UcError:
        return ()
    while len(frames) < MAX_FRAMES and rbp and not rbp & 7 and rbp <= _MASK64 - 15:
        # the layout of the function the last return address returns into
        layout = layouts.at(frames[-1] - 1)
        if layout is None:
            break
        saved, ret_at = layout
        try:
            ret = int.from_bytes(uc.mem_read((rbp + ret_at) & _MASK64, 8), "little")
            next_rbp = int.from_bytes(uc.mem_read((rbp + saved) & _MASK64, 8), "little")
        except UcError:
            break
        frames.append(ret)
        if next_rbp <= rbp:
            break
        rbp = next_rbp
    return tuple(frames)


def _bulk_kind(kind: str) -> int:
    if kind not in BULK_KINDS:
        raise ValueError(f"unknown bulk site kind {kind!r}")
    return BULK_KINDS.index(kind)


def _all_ones(size: int) -> int:
    return (1 << (8 * min(size, 4))) - 1


class NativeTracer:
    """Tracer whose callbacks are the C functions of ``kernel_emu._tracer``."""

    native = True

    def __init__(
        self,
        uc: Uc,
        regions: Sequence[tuple[int, int]],
        coverage: bool,
        ports: PortConfig | None = None,
        track_writes: bool = True,
    ) -> None:
        if native_tracer is None:
            raise ImportError("kernel_emu._tracer is not built")
        self._uc: Uc | None = uc
        self._track_writes = track_writes
        port_config = ports or PortConfig()
        self._state = native_tracer.State(
            _check_regions(regions),
            coverage,
            function_address(uclib.uc_emu_stop),
            function_address(uclib.uc_reg_read),
            console_port=port_config.console,
            service_port=port_config.service,
            console_read_value=port_config.console_read_value,
            mem_read=function_address(uclib.uc_mem_read),
            reg_write=function_address(uclib.uc_reg_write),
        )
        # Own the state from the engine before any hook can see its address: if the Uc
        # is garbage collected, Unicorn is closed (weakref finalizer) before the Uc's
        # attributes, and thus the state, are released.
        states: dict[int, Any] = uc.__dict__.setdefault(_KEEPALIVE_ATTR, {})
        states[id(self._state)] = self._state
        self._handles: list[int] = []
        self._code_hook: int | None = None
        self._probes_given: tuple[Sequence[int], Iterable[int]] | None = None
        self.until: int | None = None  # while counting blocks: where every run goes
        self._exits_taken = False  # whether exit_at turned Unicorn's own exits off
        address = self._state.address
        try:
            hooks = [(UC_HOOK_CODE, native_tracer.CODE_HOOK),
                     (UC_HOOK_BLOCK, native_tracer.BLOCK_HOOK)]
            if track_writes:
                hooks.append((UC_HOOK_MEM_WRITE, native_tracer.WRITE_HOOK))
            for hook_type, callback in hooks:
                self._handles.append(add_native_hook(uc, hook_type, callback, address))
            self._code_hook = self._handles[0]
            if ports is not None:
                for callback, insn in (
                    (native_tracer.OUT_HOOK, UC_X86_INS_OUT),
                    (native_tracer.IN_HOOK, UC_X86_INS_IN),
                ):
                    self._handles.append(
                        add_native_hook(uc, UC_HOOK_INSN, callback, address, ctypes.c_int(insn))
                    )
        except BaseException:
            self.detach()
            raise
        # Code translated before the hooks existed would never call them.
        uc.ctl_flush_tb()

    @property
    def state(self) -> Any:
        """The native state object the hooks write into (for tests and benchmarks)."""
        return self._state

    def reset(self, budget: int) -> None:
        self._state.reset(_check_budget(budget))

    def _sweep_hooks(self) -> None:
        # Unicorn keeps deleted hooks in its list until a uc_emu_start ends, and code
        # translated meanwhile would call them: an empty run (to where it starts) ends one.
        # The block cached at the start would run regardless of the exit: dropped first.
        uc = self._uc
        if uc is not None:
            pc = uc.reg_read(UC_X86_REG_RIP)
            uc.ctl_remove_cache(pc, pc + 1)
            if self._exits_taken:
                uc.ctl_set_exits([pc])
            try:
                uc.emu_start(pc, pc)
            finally:
                if self._exits_taken:
                    uc.ctl_set_exits([])

    def exit_at(self, address: int) -> None:
        """Native only: stop the guest before the instruction at `address`, uncounted, as
        ``emu_start``'s `until` would (which from now on has no effect on this engine):
        :attr:`exited` tells when it did. Unicorn, given `until`, walks the page of `until -
        1` at the end of every ``emu_start`` and drops the block translated there, the last
        one before the stop, which the next run must then translate again."""
        uc = self._uc
        if uc is None:
            raise ValueError("the tracer is detached")
        if not self._exits_taken:
            # exit points on and none set: Unicorn neither stops nor walks anything
            uc.ctl_exits_enabled(True)
            uc.ctl_set_exits([])
            self._exits_taken = True
        self._state.set_exit(address)

    @property
    def exited(self) -> bool:
        """Whether the guest stopped at :meth:`exit_at`'s address since reset."""
        return bool(self._state.exit_hit)

    def extend(self, budget: int, limit: int | None = None) -> None:
        self._state.extend(_check_budget(budget), None if limit is None else _check_budget(limit))

    @property
    def instructions(self) -> int:
        return self._state.instructions

    @property
    def budget_exhausted(self) -> bool:
        return self._state.exhausted

    def take_dirty(self) -> list[tuple[int, int]]:
        _check_tracking(self._track_writes)
        return self._state.take_dirty()

    @property
    def identity_cr3(self) -> int:
        return self._state.identity_cr3

    @identity_cr3.setter
    def identity_cr3(self, value: int) -> None:
        self._state.identity_cr3 = value

    @property
    def identity_crossings(self) -> int:
        return self._state.identity_crossings

    def recent_blocks(self) -> list[int]:
        return self._state.recent_blocks()

    def coverage(self) -> memoryview:
        return memoryview(self._state)

    def coverage_lines(self) -> bytes | None:
        return self._state.coverage_lines()

    def console(self) -> bytes:
        return self._state.console()

    @property
    def console_dropped(self) -> int:
        return self._state.console_dropped

    def trust_zeros(self, pages: bytes | None) -> None:
        self._state.trust_zeros(pages)

    @property
    def zeros_taken(self) -> int:
        return self._state.zeros_taken

    @property
    def pages_left_absent(self) -> int:
        return self._state.pages_left_absent

    def take_left_absent(self) -> list[bytes | None]:
        return self._state.take_left_absent()

    def take_service(self) -> int | None:
        return self._state.take_service()

    def port_log(self) -> list[tuple[str, int, int, int]]:
        return self._state.port_log()

    def watch(self, addresses: Sequence[int]) -> None:
        self._state.watch(_check_watch(addresses))

    def unwind(self, entries: Sequence[tuple[int, int, int, int]]) -> None:
        self._state.unwind(list(entries))

    def guard(self, width: int, sites: Sequence[tuple[int, int]], args: Arguments) -> None:
        redzones.check_sites(width, sites, args)
        size, freed, resized, new_size = (redzones.REGISTERS.index(name) for name in args)
        self._state.guard(width, list(sites), (size, freed, resized, new_size))

    def check_guards(self) -> None:
        self._state.check_guards()

    def take_guard_hits(self) -> list[GuardHit]:
        return [GuardHit._make(hit) for hit in self._state.take_guard_hits()]

    def fast_forward(self, sites: Sequence[BulkSite],
                     ram: Sequence[tuple[int, int, int, bool]]) -> None:
        self._state.bulk([(site.address, _bulk_kind(site.kind)) for site in sites],
                         [(base, size, host, absent_zero)
                          for base, size, host, absent_zero in ram])
        self._state.bulk_on = bool(sites)

    @property
    def fast_units(self) -> int:
        return self._state.bulk_units

    @property
    def console_units(self) -> int:
        return self._state.console_units

    @property
    def copies_left_absent(self) -> int:
        return self._state.copies_left_absent

    def stop_at(self, address: int | None, nth: int = 1) -> None:
        self._state.stop_at(address, nth)

    @property
    def stop_hit(self) -> bool:
        return self._state.stop_hit

    def quiet_resume(self) -> None:
        self._state.quiet_resume()

    def end_run(self) -> None:
        self._state.end_run()

    @property
    def blocks(self) -> int:
        return self._state.blocks

    @property
    def event_count(self) -> int:
        return self._state.event_count

    def skip(self, instructions: int, blocks: int, periods: int, before: bytes,
             after: bytes) -> None:
        self._state.skip(instructions, blocks, periods, before, after)

    def stop_when_same(self, address: int, registers: Sequence[int] | None,
                       max_arrivals: int) -> None:
        """Native only: :meth:`stop_at` the next arrival at ``address`` whose ``registers``
        (Unicorn register ids) hold what they held at the first arrival, which is read when it
        comes, without a stop; after ``max_arrivals`` arrivals past the first without one, the
        search ends by itself (no stop). ``registers`` None: go on with the current search.
        :attr:`same_arrivals` counts the arrivals past the first."""
        self._state.stop_when_same(address, registers, max_arrivals)

    @property
    def same_arrivals(self) -> int:
        return self._state.same_arrivals

    def start_probes(self, first: int, pml4: int, registers: Sequence[int],
                     max_arrivals: int, no_stop: Iterable[int]) -> None:
        """Native only, after :meth:`reset`: make the cycle search's probes in the hooks
        from now on, without a stop. When the budget (set at a probe's count, below its
        limit) is reached at `first` instructions outside bulk moves, then at twice each
        probe's count, the tracer logs the probe, moves the budget on to the next one, and
        arms :meth:`stop_when_same` at the block the guest is in, with `registers` and
        `max_arrivals`, unless that block is in `no_stop` or CR3 is not `pml4`.
        :meth:`reset` ends them."""
        # a job's runs pass the same tuple and frozenset: handed over once
        given = self._probes_given
        same = given is not None and registers is given[0] and no_stop is given[1] and \
            isinstance(registers, tuple) and isinstance(no_stop, (tuple, frozenset))
        self._state.start_probes(first, pml4, None if same else list(registers), max_arrivals,
                                 None if same else list(no_stop))
        self._probes_given = (registers, no_stop)

    def stop_probes(self, searches_only: bool = False) -> None:
        """No more searches armed by the probes; unless `searches_only`, no more probes."""
        self._state.stop_probes(searches_only)

    @property
    def probe(self) -> tuple[int | None, int, int, int]:
        """Since :meth:`start_probes`: the next probe's count outside bulk moves (None: no
        more), the probes made, the searches they armed, and where the last one was armed."""
        return self._state.probe

    def probe_log(self) -> list[tuple[int, int]]:
        """The first 64 probes since :meth:`start_probes`: (count outside bulk moves, bulk
        iterations) at each."""
        return self._state.probe_log()

    def take_events(self) -> list[WatchEvent]:
        # a NamedTuple (a few hundred of these per run, built far faster than dataclasses),
        # made natively
        return self._state.take_events(WatchEvent)

    @property
    def events_dropped(self) -> int:
        return self._state.events_dropped

    def count_blocks(self, text: Sequence[tuple[int, int]], precise: Sequence[tuple[int, int]],
                     until: int) -> None:
        """Count instructions per translated block from now on instead of per instruction,
        with the same counts, stops and events (see ``kernel_emu/native/blockcount.h``):
        `text` holds the [start, end) ranges of code that never changes, `precise` ranges
        run under the per-instruction hook always (code that stops the guest at an ``out``),
        and every run must stop at `until` (:meth:`exit_at`). After a fault, :meth:`settle`
        mends the count before it is read."""
        uc = self._uc
        if uc is None or self._code_hook is None:
            raise ValueError("the tracer is detached or counts blocks already")
        status = uclib.uc_hook_del(uc._uch, ctypes.c_size_t(self._code_hook))
        if status != 0:
            raise UcError(status)
        self._handles.remove(self._code_hook)
        self._code_hook = None
        self._sweep_hooks()
        self._state.count_blocks(
            function_address(uc._uch), function_address(uclib.uc_hook_add),
            function_address(uclib.uc_hook_del), function_address(uclib.uc_ctl),
            [(int(lo), int(hi)) for lo, hi in text],
            sorted((int(lo), int(hi)) for lo, hi in precise), until)
        self.until = until
        uc.ctl_flush_tb()

    @property
    def counts_blocks(self) -> bool:
        return self._code_hook is None and self._uc is not None

    def settle(self, pc: int) -> bool:
        """After a fault at `pc`: take back what the block it interrupted counted but never
        ran; False when that cannot be counted (the run's count is then not exact)."""
        return bool(self._state.settle(pc))

    @property
    def count_inexact(self) -> bool:
        """Counting per block: a count since the last reset cannot be vouched for (a
        service ``out`` in a block counted whole, say); the run must not be trusted."""
        return bool(self._state.count_inexact)

    def block_counts(self) -> dict[str, Any] | None:
        """Counting per block (see the native ``block_counts``): block entries counted whole
        and their instructions, instructions announced in precise ranges, points announced in
        blocks counted whole, blocks made precise on the spot, the precise ranges, blocks
        known, and whether a count since the last reset cannot be vouched for; None when
        counting per instruction."""
        counts: dict[str, Any] | None = self._state.block_counts()
        return counts

    def detach(self) -> None:
        uc = self._uc
        if uc is None:
            return
        self._uc = None
        self._state.stop_counting_blocks()
        errors = []
        for handle in self._handles:
            status = uclib.uc_hook_del(uc._uch, ctypes.c_size_t(handle))
            if status != 0:
                errors.append(status)
        self._handles.clear()
        if self._exits_taken:
            uc.ctl_exits_enabled(False)  # `until` stops the guest again
            self._exits_taken = False
        if errors:
            # A hook may still point at the state: keep it owned by the engine forever
            # rather than risk a callback into freed memory.
            raise UcError(errors[0])
        uc.__dict__.get(_KEEPALIVE_ATTR, {}).pop(id(self._state), None)
        uc.ctl_flush_tb()


class PythonTracer:
    """Same semantics as :class:`NativeTracer` with Python callbacks: correct but slow."""

    native = False

    def __init__(
        self,
        uc: Uc,
        regions: Sequence[tuple[int, int]],
        coverage: bool,
        ports: PortConfig | None = None,
        track_writes: bool = True,
    ) -> None:
        self._uc: Uc | None = uc
        self._ports = ports or PortConfig()
        self._track_writes = track_writes
        self._regions = [
            (base >> PAGE_SHIFT, size >> PAGE_SHIFT) for base, size in _check_regions(regions)
        ]
        self._coverage_on = coverage
        self._map = bytearray(MAP_SIZE)
        self._ring = [0] * RING_SIZE
        self._budget = NO_BUDGET
        self._watched: frozenset[int] = frozenset()
        self._unwind = _SYSTEM_V
        self._guard: Redzones | None = None
        self._clear()
        self._identity_cr3 = 0
        self._handles = [
            uc.hook_add(UC_HOOK_CODE, self._on_code),
            uc.hook_add(UC_HOOK_BLOCK, self._on_block),
        ]
        if track_writes:
            self._handles.append(uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write))
        if ports is not None:
            for callback, insn in ((self._on_out, UC_X86_INS_OUT), (self._on_in, UC_X86_INS_IN)):
                self._handles.append(uc.hook_add(UC_HOOK_INSN, callback, None, 1, 0, insn))
        uc.ctl_flush_tb()

    def _clear(self) -> None:
        self._count = 0
        self._exhausted = False
        self._prev = 0
        self._ring_pos = 0
        self._map[:] = bytes(MAP_SIZE)
        self._dirty: list[set[int]] = [set() for _ in self._regions]
        self._other: set[int] = set()
        self._unknown = False
        self._identity_crossings = 0
        self._stop_pending = False
        self._console = bytearray()
        self._console_dropped = 0
        self._service: int | None = None
        self._port_log: list[tuple[str, int, int, int]] = []
        self._events: list[WatchEvent] = []
        self._events_dropped = 0
        self._events_seen = 0
        if self._guard is not None:
            self._guard.clear()
        self._stop_addr: int | None = None
        self._stop_left = 0
        self._stop_armed_at = 0
        self._stop_hit = False
        self._quiet_block = False

    def _on_code(self, uc: Uc, address: int, size: int, user_data: Any) -> None:
        if self._stop_pending:
            # The instruction after a service OUT: announced, but Unicorn stops before it.
            self._stop_pending = False
            return
        if self._count < self._budget:
            if address == self._stop_addr and self._count != self._stop_armed_at:
                self._stop_left -= 1
                if self._stop_left == 0:
                    self._stop_addr, self._stop_hit = None, True
                    self._budget = self._count
                    self._exhausted = True
                    uc.emu_stop()
                    return
            # Only instructions that will run are watched, as in the native hook.
            if address in self._watched:
                self._record(uc, address)
            self._count += 1
            return
        self._exhausted = True
        uc.emu_stop()

    def _record(self, uc: Uc, address: int) -> None:
        self._events_seen += 1
        rip, rsp, rbp, rax, rdi, rsi, rdx, rcx, r8 = (uc.reg_read(reg) for reg in _WATCH_REGS)
        if self._guard is not None:
            self._guard.event(address, {"rsp": rsp, "rax": rax, "rsi": rsi, "rdx": rdx,
                                        "r8": r8}, self._count)
        # Read at call time so tests can lower the cap.
        if len(self._events) >= EVENT_CAP:
            self._events_dropped += 1
            return
        self._events.append(WatchEvent(address, self._count, rip, rsp, rbp, rax, rdi, rsi, rdx,
                                       rcx, r8, _walk_frames(uc, rsp, rbp, self._unwind)))

    def _on_block(self, uc: Uc, address: int, size: int, user_data: Any) -> None:
        # A block starting after a service OUT means the guest was resumed without the
        # announcement ever reaching this hook: it will not come (see the native hook).
        self._stop_pending = False
        if self._quiet_block:
            self._quiet_block = False
            return
        self._ring[self._ring_pos % RING_SIZE] = address
        self._ring_pos += 1
        if self._coverage_on:
            cur = ((address * COVERAGE_MULTIPLIER) & _MASK64) >> 48
            edge = cur ^ self._prev
            if self._map[edge] != 0xFF:
                self._map[edge] += 1
            self._prev = cur >> 1

    def _mark(self, page: int) -> None:
        for index, (first, count) in enumerate(self._regions):
            if 0 <= page - first < count:
                self._dirty[index].add(page - first)
                return
        self._other.add(page)

    def _on_write(
        self, uc: Uc, access: int, address: int, size: int, value: int, user_data: Any
    ) -> None:
        first = address >> PAGE_SHIFT
        last = ((address + max(size, 1) - 1) & _MASK64) >> PAGE_SHIFT
        self._mark(first)
        if last != first:
            # Same reasoning as the native hook: the tail's physical page is only known
            # when paging is off.
            self._mark(last)
            if uc.reg_read(UC_X86_REG_CR0) & _CR0_PG:
                cr3 = uc.reg_read(UC_X86_REG_CR3) & ~0xFFF
                if self._identity_cr3 and cr3 == self._identity_cr3:
                    self._identity_crossings += 1
                else:
                    self._unknown = True

    def _on_out(self, uc: Uc, port: int, size: int, value: int, user_data: Any) -> None:
        if port == self._ports.console:
            if len(self._console) < CONSOLE_CAP:
                self._console.append(value & 0xFF)
            else:
                self._console_dropped += 1
        elif port == self._ports.service:
            self._service = value
            self._stop_pending = True
            uc.emu_stop()
        elif len(self._port_log) < PORT_LOG_SIZE:
            self._port_log.append(("out", port, size, value))

    def _on_in(self, uc: Uc, port: int, size: int, user_data: Any) -> int:
        mask = _all_ones(size)
        if port == self._ports.console:
            return self._ports.console_read_value & mask
        if len(self._port_log) < PORT_LOG_SIZE:
            self._port_log.append(("in", port, size, mask))
        return mask

    @property
    def stop_pending(self) -> bool:
        """A service OUT asked to stop and Unicorn has not honoured it yet (for tests)."""
        return self._stop_pending

    def reset(self, budget: int) -> None:
        self._budget = _check_budget(budget)
        self._clear()

    def extend(self, budget: int, limit: int | None = None) -> None:
        if _check_budget(budget) < self._count:
            raise ValueError("a budget cannot be extended below the count")
        if limit is not None and _check_budget(limit) < budget:
            raise ValueError("a limit cannot be below the budget")
        # no bulk moves run natively here, so a floating stop is the budget itself
        self._budget = budget
        self._exhausted = False

    @property
    def instructions(self) -> int:
        return self._count

    @property
    def budget_exhausted(self) -> bool:
        return self._exhausted

    def take_dirty(self) -> list[tuple[int, int]]:
        _check_tracking(self._track_writes)
        out: list[tuple[int, int]] = []
        if self._unknown:
            out.append((OUTSIDE, UNKNOWN_PAGE))
        out.extend((OUTSIDE, page) for page in sorted(self._other))
        for index, pages in enumerate(self._dirty):
            out.extend((index, page) for page in sorted(pages))
        self._dirty = [set() for _ in self._regions]
        self._other = set()
        self._unknown = False
        return out

    @property
    def identity_cr3(self) -> int:
        return self._identity_cr3

    @identity_cr3.setter
    def identity_cr3(self, value: int) -> None:
        if not isinstance(value, int):
            raise TypeError("identity_cr3 must be an int")
        if not 0 <= value < 1 << 64:
            raise OverflowError("identity_cr3 must fit in 64 bits")
        self._identity_cr3 = value & ~0xFFF

    @property
    def identity_crossings(self) -> int:
        return self._identity_crossings

    def recent_blocks(self) -> list[int]:
        count = min(self._ring_pos, RING_SIZE)
        start = self._ring_pos - count
        return [self._ring[(start + k) % RING_SIZE] for k in range(count)]

    def coverage(self) -> memoryview:
        return memoryview(self._map).toreadonly()

    def coverage_lines(self) -> bytes | None:
        return None

    def console(self) -> bytes:
        return bytes(self._console)

    @property
    def console_dropped(self) -> int:
        return self._console_dropped

    def trust_zeros(self, pages: bytes | None) -> None:
        pass  # every bulk move is the guest's own

    @property
    def zeros_taken(self) -> int:
        return 0

    @property
    def pages_left_absent(self) -> int:
        return 0

    def take_left_absent(self) -> list[bytes | None]:
        return []

    def take_service(self) -> int | None:
        service, self._service = self._service, None
        return service

    def port_log(self) -> list[tuple[str, int, int, int]]:
        return list(self._port_log)

    def watch(self, addresses: Sequence[int]) -> None:
        self._watched = frozenset(_check_watch(addresses))

    def unwind(self, entries: Sequence[tuple[int, int, int, int]]) -> None:
        self._unwind = _check_unwind(entries)

    def guard(self, width: int, sites: Sequence[tuple[int, int]], args: Arguments) -> None:
        roles = redzones.check_sites(width, sites, args)
        self._guard = Redzones(width, args, roles, self._read) if width else None

    def _read(self, address: int, size: int) -> bytes | None:
        assert self._uc is not None
        try:
            return bytes(self._uc.mem_read(address, size))
        except UcError:
            return None

    def check_guards(self) -> None:
        if self._guard is not None and not self._guard.pending:
            self._guard.check(self._count)

    def take_guard_hits(self) -> list[GuardHit]:
        if self._guard is None:
            return []
        hits = list(self._guard.hits)
        self._guard.hits.clear()
        return hits

    def fast_forward(self, sites: Sequence[BulkSite],
                     ram: Sequence[tuple[int, int, int, bool]]) -> None:
        for site in sites:
            _bulk_kind(site.kind)  # same validation as the native tracer, nothing else

    @property
    def fast_units(self) -> int:
        return 0

    @property
    def console_units(self) -> int:
        return 0

    @property
    def copies_left_absent(self) -> int:
        return 0

    def stop_at(self, address: int | None, nth: int = 1) -> None:
        if address is not None and (nth < 1 or not 0 <= address < _MASK64):
            raise ValueError("bad stop address or arrival count")
        self._stop_addr, self._stop_left, self._stop_hit = address, nth, False
        self._stop_armed_at = self._count

    @property
    def stop_hit(self) -> bool:
        return self._stop_hit

    def quiet_resume(self) -> None:
        self._quiet_block = True

    def end_run(self) -> None:
        pass  # counts per instruction, always

    @property
    def blocks(self) -> int:
        return self._ring_pos

    @property
    def event_count(self) -> int:
        return self._events_seen

    def skip(self, instructions: int, blocks: int, periods: int, before: bytes,
             after: bytes) -> None:
        if len(before) != MAP_SIZE or len(after) != MAP_SIZE:
            raise ValueError("coverage maps must be MAP_SIZE bytes")
        went_down = any(a < b for a, b in zip(after, before, strict=True))
        if instructions > self._budget - self._count or self._stop_pending or \
                self._ring_pos < RING_SIZE or went_down:
            raise ValueError("skip past the budget, during a service stop, before the recent "
                             "blocks are full, or with a coverage map that went down")
        self._count += instructions
        old = list(self._ring)
        for k in range(RING_SIZE):
            n = self._ring_pos - RING_SIZE + k
            self._ring[(n + blocks) % RING_SIZE] = old[n % RING_SIZE]
        self._ring_pos += blocks
        if self._coverage_on:
            for i, (a, b) in enumerate(zip(after, before, strict=True)):
                if a != b:
                    self._map[i] = min(255, self._map[i] + (a - b) * min(periods, 255))

    def take_events(self) -> list[WatchEvent]:
        events, self._events = self._events, []
        return events

    @property
    def events_dropped(self) -> int:
        return self._events_dropped

    def detach(self) -> None:
        uc = self._uc
        if uc is None:
            return
        self._uc = None
        for handle in self._handles:
            uc.hook_del(handle)
        self._handles.clear()
        uc.ctl_flush_tb()


def native_available() -> bool:
    """True if the ``kernel_emu._tracer`` extension can be imported."""
    return native_tracer is not None


def attach_tracer(
    uc: Uc,
    regions: Sequence[tuple[int, int]],
    *,
    native: bool = True,
    coverage: bool = True,
    ports: PortConfig | None = None,
    track_writes: bool = True,
) -> GuestTracer:
    """Hook ``uc`` and return a tracer for it.

    ``regions`` are page-aligned guest-physical RAM ranges ``(base, size)`` whose writes
    are tracked per page; indices in :meth:`GuestTracer.take_dirty` refer to this order.
    ``native=False`` forces the Python fallback, which is also used, with a warning, when
    the extension is not built.  The tracer starts with no budget; call ``reset`` before
    each run.

    With ``ports``, the tracer also hooks OUT and IN and serves the ports as described in
    :class:`PortConfig`; without, it hooks neither and its port results stay empty.  Unicorn
    calls every OUT hook but asks only the FIRST registered IN hook for the value, so IN
    from this tracer's ports is only served if no other IN hook was added to ``uc`` before.

    ``track_writes=False`` leaves guest stores unhooked and makes :meth:`GuestTracer.take_dirty`
    raise.  A ``UC_HOOK_MEM_WRITE`` hook over a page keeps every store to it on Unicorn's slow
    path, so a caller that learns the written pages another way should not pay for one.
    """
    if native:
        if native_tracer is not None:
            return NativeTracer(uc, regions, coverage, ports, track_writes)
        warnings.warn(
            "kernel_emu._tracer is not built (pip install -e .); tracing with slow Python hooks",
            RuntimeWarning,
            stacklevel=2,
        )
    return PythonTracer(uc, regions, coverage, ports, track_writes)
