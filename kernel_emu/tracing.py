"""Per-run guest tracing: instruction budget, edge coverage, recent blocks and dirty pages.

The fuzzing loop restores a snapshot between runs, so it needs to know, cheaply, what the
guest did during one run:

* how many instructions it executed, with a hard budget that stops a hang exactly;
* AFL-style edge coverage, to steer the fuzzer;
* the last blocks it executed, to say where a hang spins;
* which RAM pages it wrote, so the restore copies only those.

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
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from unicorn import UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_MEM_WRITE, Uc, UcError
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_CR0

try:
    from kernel_emu import _tracer
except ImportError:  # not built: attach_tracer falls back to Python hooks
    _tracer = None

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
RING_SIZE = 64
MAP_SIZE = 65536
COVERAGE_MULTIPLIER = 0x9E3779B97F4A7C15
NO_BUDGET = (1 << 64) - 1
OUTSIDE = -1
UNKNOWN_PAGE = -1

_CR0_PG = 1 << 31
_MASK64 = (1 << 64) - 1
# Attribute on the Uc object that owns the native states: hooks hold raw pointers to them,
# so they must live exactly as long as the engine that may call those hooks.
_KEEPALIVE_ATTR = "_kernel_emu_tracer_states"


@runtime_checkable
class GuestTracer(Protocol):
    """What a run of the guest did, gathered by hooks on one Unicorn engine.

    Call :meth:`reset` before each run.  All results describe the guest's activity since
    the last reset (dirty pages: since the last :meth:`take_dirty` or reset).  None of the
    methods may be called while ``emu_start`` is running in another thread.
    """

    native: bool
    """True when the callbacks are C functions, False for the slow Python fallback."""

    def reset(self, budget: int) -> None:
        """Zero counters, coverage, recent blocks and dirty sets; arm ``budget``.

        The guest is stopped (``uc_emu_stop``) before it starts instruction number
        ``budget + 1``; pass :data:`NO_BUDGET` for no limit.
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

    def take_dirty(self) -> list[tuple[int, int]]:
        """Return and forget the pages the GUEST wrote since the last take or reset.

        Entries are ``(region_index, page_index_within_region)``, sorted.  Entries with
        region index :data:`OUTSIDE` mean the set is incomplete and a full restore is
        needed: ``(OUTSIDE, n)`` is a write to physical page ``n`` outside every region,
        ``(OUTSIDE, UNKNOWN_PAGE)`` a write whose physical pages could not all be named.
        """
        ...

    def recent_blocks(self) -> list[int]:
        """Start addresses of the last 64 executed blocks, oldest first."""
        ...

    def coverage(self) -> memoryview:
        """The 65536 saturating 8-bit edge counters (read-only view; zero if disabled)."""
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


def _function_address(function: Any) -> int:
    address = ctypes.cast(function, ctypes.c_void_p).value
    if not address:
        raise RuntimeError("cannot resolve a Unicorn entry point")
    return address


class NativeTracer:
    """Tracer whose callbacks are the C functions of ``kernel_emu._tracer``."""

    native = True

    def __init__(self, uc: Uc, regions: Sequence[tuple[int, int]], coverage: bool) -> None:
        if _tracer is None:
            raise ImportError("kernel_emu._tracer is not built")
        self._uc: Uc | None = uc
        self._state = _tracer.State(
            _check_regions(regions),
            coverage,
            _function_address(uclib.uc_emu_stop),
            _function_address(uclib.uc_reg_read),
        )
        # Own the state from the engine before any hook can see its address: if the Uc
        # is garbage collected, Unicorn is closed (weakref finalizer) before the Uc's
        # attributes, and thus the state, are released.
        states: dict[int, Any] = uc.__dict__.setdefault(_KEEPALIVE_ATTR, {})
        states[id(self._state)] = self._state
        self._handles: list[int] = []
        try:
            for hook_type, callback in (
                (UC_HOOK_CODE, _tracer.CODE_HOOK),
                (UC_HOOK_BLOCK, _tracer.BLOCK_HOOK),
                (UC_HOOK_MEM_WRITE, _tracer.WRITE_HOOK),
            ):
                handle = ctypes.c_size_t()
                status = uclib.uc_hook_add(
                    uc._uch,
                    ctypes.byref(handle),
                    hook_type,
                    ctypes.c_void_p(callback),
                    ctypes.c_void_p(self._state.address),
                    ctypes.c_uint64(1),  # begin > end: every address
                    ctypes.c_uint64(0),
                )
                if status != 0:
                    raise UcError(status)
                self._handles.append(handle.value)
        except BaseException:
            self.detach()
            raise
        # Code translated before the hooks existed would never call them.
        uc.ctl_flush_tb()

    def reset(self, budget: int) -> None:
        self._state.reset(_check_budget(budget))

    @property
    def instructions(self) -> int:
        return self._state.instructions

    @property
    def budget_exhausted(self) -> bool:
        return self._state.exhausted

    def take_dirty(self) -> list[tuple[int, int]]:
        return self._state.take_dirty()

    def recent_blocks(self) -> list[int]:
        return self._state.recent_blocks()

    def coverage(self) -> memoryview:
        return memoryview(self._state)

    def detach(self) -> None:
        uc = self._uc
        if uc is None:
            return
        self._uc = None
        errors = []
        for handle in self._handles:
            status = uclib.uc_hook_del(uc._uch, ctypes.c_size_t(handle))
            if status != 0:
                errors.append(status)
        self._handles.clear()
        if errors:
            # A hook may still point at the state: keep it owned by the engine forever
            # rather than risk a callback into freed memory.
            raise UcError(errors[0])
        uc.__dict__.get(_KEEPALIVE_ATTR, {}).pop(id(self._state), None)
        uc.ctl_flush_tb()


class PythonTracer:
    """Same semantics as :class:`NativeTracer` with Python callbacks: correct but slow."""

    native = False

    def __init__(self, uc: Uc, regions: Sequence[tuple[int, int]], coverage: bool) -> None:
        self._uc: Uc | None = uc
        self._regions = [
            (base >> PAGE_SHIFT, size >> PAGE_SHIFT) for base, size in _check_regions(regions)
        ]
        self._coverage_on = coverage
        self._map = bytearray(MAP_SIZE)
        self._ring = [0] * RING_SIZE
        self._budget = NO_BUDGET
        self._clear()
        self._handles = [
            uc.hook_add(UC_HOOK_CODE, self._on_code),
            uc.hook_add(UC_HOOK_BLOCK, self._on_block),
            uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write),
        ]
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

    def _on_code(self, uc: Uc, address: int, size: int, user_data: Any) -> None:
        if self._count < self._budget:
            self._count += 1
            return
        self._exhausted = True
        uc.emu_stop()

    def _on_block(self, uc: Uc, address: int, size: int, user_data: Any) -> None:
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
                self._unknown = True

    def reset(self, budget: int) -> None:
        self._budget = _check_budget(budget)
        self._clear()

    @property
    def instructions(self) -> int:
        return self._count

    @property
    def budget_exhausted(self) -> bool:
        return self._exhausted

    def take_dirty(self) -> list[tuple[int, int]]:
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

    def recent_blocks(self) -> list[int]:
        count = min(self._ring_pos, RING_SIZE)
        start = self._ring_pos - count
        return [self._ring[(start + k) % RING_SIZE] for k in range(count)]

    def coverage(self) -> memoryview:
        return memoryview(self._map).toreadonly()

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
    return _tracer is not None


def attach_tracer(
    uc: Uc,
    regions: Sequence[tuple[int, int]],
    *,
    native: bool = True,
    coverage: bool = True,
) -> GuestTracer:
    """Hook ``uc`` and return a tracer for it.

    ``regions`` are page-aligned guest-physical RAM ranges ``(base, size)`` whose writes
    are tracked per page; indices in :meth:`GuestTracer.take_dirty` refer to this order.
    ``native=False`` forces the Python fallback, which is also used, with a warning, when
    the extension is not built.  The tracer starts with no budget; call ``reset`` before
    each run.
    """
    if native:
        if _tracer is not None:
            return NativeTracer(uc, regions, coverage)
        warnings.warn(
            "kernel_emu._tracer is not built (pip install -e .); tracing with slow Python hooks",
            RuntimeWarning,
            stacklevel=2,
        )
    return PythonTracer(uc, regions, coverage)
