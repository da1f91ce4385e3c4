"""Exact cycles: a run whose whole machine state repeats is skipped ahead period by period.

A hang the watchdog stops (an endless loop that writes no new page) still costs two watchdog
intervals of guest instructions, ~5 ms each time the fuzzer produces one. But the emulated
machine is deterministic and, between services, sees nothing from outside: if its entire state
(CPU context, every page the run has written, page tables included, the console, other ports,
services and watch events) is the same at two instants, everything after the second repeats
what followed the first, forever. So the state at any later instruction count is known, and
:class:`CycleFinder` moves the run there by whole periods without running them: it only asks
the tracer to account for them (count, recent blocks, coverage; see ``GuestTracer.skip``).
Every watchdog checkpoint is still reached and judged as before, with the same state, so the
Result is exactly the one of running every instruction. Without a watchdog (the profile's own
budget, as when the farm checks a stalled run) the skip goes up to the budget: an endless loop
costs a few milliseconds instead of its 60 million instructions. So does it under a watchdog
told to let a proven cycle run to the budget (kernel_emu/watchdog.py, `to_budget`): the run then
ends exactly as it would with no watchdog, and no second run is needed to learn that.

How a cycle is found, at a few probe points (4096, 8192, ... instructions, not counting the
iterations of bulk moves performed natively, which make progress by definition): the guest is
stopped at the start of the block it is in (``stop_at``), its registers are recorded, and the
guest is stopped again at each of its next arrivals there, up to :data:`MAX_ARRIVALS`. The whole
state is read only at arrivals with those registers again, and two of them with the same state
prove the cycle. The first such state is the anchor; a probe whose next :data:`MAX_CAPTURES`
states all differ from it gives up (a loop whose registers repeat while its memory moves on,
such as a counter kept on the stack, would otherwise cost a whole-state read per arrival).
Only snapshot runs under the firmware's identity page tables are probed (the Dirty bits there
name every page the run wrote), and only while the run has written at most
:data:`MAX_PAGES` pages. The extra stops leave no trace: the tracer drops
the block entry of each resume (``quiet_resume``).

The native tracer does the stopping part itself: it compares each arrival's registers with the
first arrival's and stops the guest only at one with the same (``stop_when_same``), and it makes
the probes in its hooks (``start_probes``): at a probe's count it arms that search at the block
the guest is in, where it may stop, with no stop at all. So a run that is no cycle, nearly every
run, is never stopped for the search. The pages written are then counted only when an arrival
stops the guest, where the whole state would be read: a run with too many is found so there,
and probes arm no search after it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel_emu.dirtylog import ADDR_MASK, dirty_count, dirty_leaves
from kernel_emu.machine import PAGE, REGISTER_IDS, Machine
from kernel_emu.tracing import RING_SIZE, GuestTracer

FIRST_PROBE = 4096
MAX_ARRIVALS = 16
# whole states read per probe after its anchor: cycles of up to this many arrivals are found
MAX_CAPTURES = 3
MAX_PAGES = 256


@dataclass(frozen=True)
class _State:
    instructions: int
    blocks: int
    coverage: bytes
    # everything else must be equal for two states to be the same
    same: tuple[object, ...]


@dataclass(frozen=True)
class _Cycle:
    instructions: int
    blocks: int
    visits: int  # arrivals at the probe address per period
    before: bytes
    after: bytes


class CycleFinder:
    """Per-run cycle search and skipping (see the module doc), on machine `m` whose
    identity page tables are at `pml4`. `no_stop` holds the addresses where the tracer
    already stops or acts (watches, bulk moves): a probe never stops there. `checkpoint`
    gives how far a skip may go (the watchdog's next checkpoint, or the run's budget),
    `services` the boot services performed so far."""

    def __init__(self, m: Machine, tracer: GuestTracer, pml4: int, no_stop: frozenset[int],
                 checkpoint: Callable[[], int], services: Callable[[], int],
                 native_arrivals: bool = False) -> None:
        self.m, self.tracer, self.pml4, self.no_stop = m, tracer, pml4, no_stop
        # the native tracer compares the registers of each arrival itself and stops only at
        # those equal to the first arrival's (the only ones this search reads memory at), or
        # never: the same search without a stop per arrival
        self._same: Any = (tracer if native_arrivals and hasattr(tracer, "stop_when_same")
                           else None)
        # and it makes the probes themselves, without a stop (start_probes): this search
        # learns of one only at the arrival it armed the guest to stop at
        self._native: Any = self._same if hasattr(self._same, "start_probes") else None
        self._searches = 0  # the tracer's searches taken up so far
        self._checkpoint, self._services = checkpoint, services
        self._probe_at: int | None = FIRST_PROBE  # in instructions outside bulk moves
        self._address: int | None = None
        self._first: dict[str, int] | None = None  # registers at the first arrival
        # the whole state at a later arrival with those registers
        self._anchor: _State | None = None
        self._anchored_at = 0
        self._arrivals = 0
        self._captures = 0  # whole states read since the anchor
        self._cycle: _Cycle | None = None
        self._regime = 0  # block entries from here on follow the periodic sequence
        self.skipped = 0
        self._too_large = False  # the run wrote more pages than a state may hold
        # for tests and diagnostics: (instructions outside bulk moves, bulk iterations) at
        # each probe, and the stops that were neither a probe nor an arrival (none expected)
        self._probes: list[tuple[int, int]] = []
        self.idle_stops = 0

    def start(self) -> None:
        """After the tracer's reset for the run: the probes start."""
        if self._native is not None:
            self._native.start_probes(FIRST_PROBE, self.pml4, REGISTER_IDS, MAX_ARRIVALS,
                                      self.no_stop)

    @property
    def probes(self) -> list[tuple[int, int]]:
        """For tests and diagnostics: (instructions outside bulk moves, bulk iterations) at
        each probe (at most the first 64 when the tracer makes them)."""
        return self._native.probe_log() if self._native is not None else self._probes

    @property
    def proven(self) -> bool:
        """Whether this run is in an exact cycle: it repeats for ever, whatever its budget."""
        return self._cycle is not None

    @property
    def next_probe(self) -> int | None:
        """The instruction count of the next probe if no bulk move comes first (the tracer's
        floating stop moves it on by each iteration of one)."""
        at = self._native.probe[0] if self._native is not None else self._probe_at
        if at is None:
            return None
        tracer = self.tracer
        return tracer.instructions + max(0, at - self._own(tracer))

    @staticmethod
    def _own(tracer: GuestTracer) -> int:
        return tracer.instructions - tracer.fast_units

    def on_stop(self) -> None:
        """At a stop of ours (a probe or an arrival), before the guest resumes."""
        tracer = self.tracer
        tracer.quiet_resume()
        if tracer.stop_hit:
            self._arrived()
        elif (self._native is None and self._probe_at is not None
              and self._own(tracer) >= self._probe_at):
            self._probe()
        else:
            self.idle_stops += 1

    def after_checkpoint(self) -> None:
        """The watchdog let the run go on: its resume is a block entry outside the periodic
        sequence, so a skip waits until the recent blocks have all been run since."""
        if self._cycle is None:
            return
        self._regime = self.tracer.blocks + 1
        self._arm_for_skip()

    def _probe(self) -> None:
        tracer = self.tracer
        self._probes.append((self._own(tracer), tracer.fast_units))
        self._probe_at = 2 * self._own(tracer)
        blocks = tracer.recent_blocks()
        if not blocks or not self._may_stop_at(blocks[-1]) or not self._small_enough():
            return
        self._address, self._first, self._anchor, self._arrivals = blocks[-1], None, None, 0
        self._captures = 0
        if self._same is not None:
            self._same.stop_when_same(self._address, REGISTER_IDS, MAX_ARRIVALS)
            return
        tracer.stop_at(self._address)

    def _small_enough(self) -> bool:
        """Whether a state could be captured now (see :meth:`_capture`): a run that has
        written more pages is no candidate, and costs no stop. A run found too large once is
        not counted again: pages it wrote stay written, and a probe left out only costs a
        cycle not found, never a different Result."""
        if self._too_large or not self._under_identity_tables():
            return False
        count = dirty_count(self.m, self.pml4, accessed_level=2)
        if count is None or count > MAX_PAGES:
            self._too_large = True
            return False
        return True

    def _under_identity_tables(self) -> bool:
        """Whose Dirty bits name every page the run wrote (see the module doc)."""
        return self.m.reg("cr3") & ADDR_MASK == self.pml4

    def _may_stop_at(self, address: int) -> bool:
        return address not in self.no_stop

    def _arrived(self) -> None:
        tracer = self.tracer
        if self._cycle is not None:
            self._skip()
            return
        if self._same is not None:
            # an arrival whose registers equal the first arrival's (the tracer compared them)
            if self._native is not None:
                _, _, searches, address = self._native.probe
                if searches != self._searches:
                    # of a search a probe armed since: it starts afresh, as a probe here would
                    self._address, self._first, self._anchor = address, None, None
                    self._arrivals = self._captures = 0
                    self._searches = searches
            self._arrivals = self._same.same_arrivals
            self._same_registers()
            return
        registers = self.m.registers()
        if self._first is None:
            # memory is read only once these registers come back: a loop that makes progress
            # (most of them, e.g. one mapping pages) never costs more than this
            self._first = registers
            tracer.stop_at(self._address)
            return
        self._arrivals += 1
        if registers != self._first:
            self._next_arrival()
            return
        self._same_registers()

    def _same_registers(self) -> None:
        """At an arrival with the first arrival's registers: compare the whole state."""
        state = self._capture()
        if state is None:
            self._drop()
            return
        anchor = self._anchor
        if anchor is None:
            self._anchor, self._anchored_at = state, self._arrivals
            self._regime = max(self._regime, state.blocks)
            self._next_arrival()
            return
        if state.same == anchor.same:
            self._cycle = _Cycle(state.instructions - anchor.instructions,
                                 state.blocks - anchor.blocks, self._arrivals - self._anchored_at,
                                 anchor.coverage, state.coverage)
            if self._native is not None:
                self._native.stop_probes()
            else:
                self._probe_at = None
            self._skip()
            return
        self._captures += 1
        if self._captures >= MAX_CAPTURES:
            self._drop()
        else:
            self._next_arrival()

    def _next_arrival(self) -> None:
        if self._arrivals < MAX_ARRIVALS:
            assert self._address is not None
            if self._same is not None:
                self._same.stop_when_same(self._address, None, MAX_ARRIVALS)
            else:
                self.tracer.stop_at(self._address)
        else:
            self._drop()

    def _drop(self) -> None:
        self._address, self._first, self._anchor, self._cycle = None, None, None, None
        self.tracer.stop_at(None)

    def _arm_for_skip(self) -> None:
        cycle, tracer = self._cycle, self.tracer
        assert cycle is not None and self._address is not None
        missing = RING_SIZE - (tracer.blocks - self._regime)
        periods = 1 + max(0, -(-missing // cycle.blocks)) if cycle.blocks else 1
        tracer.stop_at(self._address, cycle.visits * periods)

    def _skip(self) -> None:
        """Move on by as many whole periods as fit before the next checkpoint."""
        cycle = self._cycle
        assert cycle is not None
        tracer = self.tracer
        if cycle.instructions <= 0 or tracer.blocks - self._regime < RING_SIZE:
            if cycle.instructions > 0:
                self._arm_for_skip()
            return
        periods = (self._checkpoint() - tracer.instructions) // cycle.instructions
        if periods > 0:
            tracer.skip(periods * cycle.instructions, periods * cycle.blocks, periods,
                        cycle.before, cycle.after)
            self.skipped += periods * cycle.instructions

    def _capture(self) -> _State | None:
        m, tracer = self.m, self.tracer
        if not self._under_identity_tables():
            return None
        # page tables the run did not use are as in the snapshot (the log clears Accessed)
        walk = dirty_leaves(m, self.pml4, accessed_level=2)
        if walk is None:
            return None
        pages = sorted(set(walk.pages).union(walk.tables))
        if len(pages) > MAX_PAGES:
            # the pages written stay written: no later probe could capture either (the
            # tracer's probes do not count them, so only an arrival finds this out)
            self._too_large = True
            if self._native is not None:
                self._native.stop_probes(searches_only=True)
            return None
        memory = b"".join(m.read(page, PAGE) for page in pages)
        context = m.uc.context_save()
        # a saved context is a header (its first field: the size of the CPU state that ends
        # it) with bookkeeping pointers that differ between two saves of the same state
        base = context.context.value
        state_size = ctypes.c_size_t.from_address(base).value
        cpu = ctypes.string_at(base + context.size - state_size, state_size)
        same = (cpu, tuple(pages), memory, tracer.console(), tracer.console_dropped,
                len(tracer.port_log()), tracer.event_count, self._services())
        return _State(tracer.instructions, tracer.blocks, bytes(tracer.coverage()), same)
