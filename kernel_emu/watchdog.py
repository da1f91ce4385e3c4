"""The run's stops before its budget: watchdog checkpoints and the cycle search's probes.

Every `interval` instructions, a run whose guest is not inside a bulk memory routine (zeroing
or copying a large segment) and has written no page it had not written before in this run is
stopped as stalled: a fuzzer's early verdict on a loop that makes no progress, instead of
spending the whole budget on it. Between checkpoints the tracer may also stop for the cycle
search (kernel_emu/cycles.py), which is not counted in bulk-move iterations.

A run the cycle search has proven to be in an exact cycle makes no progress and never will.
With `to_budget`, no checkpoint stops it as stalled: it goes on to its budget, which the cycle
search reaches by whole periods, so the run ends as it would with no watchdog at all (the
profile's own budget), and its Result is that one: what the farm would otherwise boot again
without a watchdog to learn. A loop the search cannot prove (its memory moves on, say) is
still stopped at a checkpoint.
"""

from __future__ import annotations

from typing import Any

from kernel_emu.cycles import CycleFinder
from kernel_emu.dirtylog import MAX_PAGES, MAX_TABLES
from kernel_emu.dirtypages import CHECKPOINT_ACCESSED_LEVEL, WrittenPages
from kernel_emu.machine import Machine
from kernel_emu.tracing import GuestTracer, NativeTracer


class Watchdog:
    """The stops of the runs on one machine. `interval` None: no checkpoints, only the
    budget (and the cycle search, if one is given to `start_run`). `to_budget`: a run in a
    proven exact cycle goes on to its budget instead (see the module doc)."""

    def __init__(self, m: Machine, tracer: GuestTracer, interval: int | None,
                 bulk_ranges: tuple[tuple[int, int], ...], written: WrittenPages,
                 to_budget: bool = False) -> None:
        self.m, self.tracer, self.interval = m, tracer, interval
        self.to_budget = to_budget
        self.bulk_ranges, self.written = bulk_ranges, written
        self.run_budget = 0
        self.next_checkpoint = 0
        self.stalled_at = 0  # the instruction count at which the run was called stalled
        self.cycles: CycleFinder | None = None
        # The native tracer passes the checkpoints where the run made progress itself, with
        # no stop (its `checkpoints`): only those of snapshot runs, whose Dirty count is the
        # page-table log's. Every other stop still comes here, with the checkpoint and the
        # count it has reached (_take_back), and the watchdog's decision goes back to it
        # (_hand_over). A stop costs the guest's exit and re-entry and this module's Python,
        # ~20 µs; a run that loads megabytes meets several.
        state = tracer.state if isinstance(tracer, NativeTracer) else None
        self._native: Any = state if (interval and written.log is not None and
                                      hasattr(state, "checkpoints")) else None
        if self._native is not None:
            try:
                self._native.checkpoint_walk(written.fw.pml4, CHECKPOINT_ACCESSED_LEVEL,
                                             MAX_PAGES, MAX_TABLES, bulk_ranges)
            except ValueError:  # more bulk routines than it holds: every checkpoint stops
                self._native = None

    def start_run(self, run_budget: int, cycles: CycleFinder | None) -> None:
        """Reset the tracer for a run of `run_budget` instructions and arm its first stop."""
        self.run_budget = run_budget
        self.stalled_at = 0
        self.written.start_run()
        self.next_checkpoint = min(run_budget, self.interval) if self.interval else run_budget
        self.cycles = cycles
        self.tracer.reset(self.next_checkpoint)
        if cycles is not None:
            cycles.start()
        self._arm_next_stop()
        self._hand_over()

    def _hand_over(self) -> None:
        """The tracer passes the checkpoints from here, as keep_going would (not once the
        cycle search has proven a cycle: a checkpoint then arms its skip)."""
        if self._native is not None:
            cycles = self.cycles
            self._native.checkpoints(cycles is None or not cycles.proven, self.next_checkpoint,
                                     self.written.checkpoint_count, self.run_budget,
                                     self.interval)

    def _take_back(self) -> None:
        """At a stop: the checkpoint and the Dirty count the tracer has reached."""
        if self._native is not None:
            self.next_checkpoint, self.written.checkpoint_count, _ = self._native.checkpoint

    @property
    def passed_natively(self) -> int:
        """Checkpoints of the last run the tracer passed with no stop."""
        return self._native.checkpoint[2] if self._native is not None else 0

    def _arm_next_stop(self) -> None:
        """Stop at the next checkpoint, or before it at the cycle search's next probe, which
        is not counted in bulk-move iterations (a run loading megabytes is no cycle)."""
        probe = self.cycles.next_probe if self.cycles is not None else None
        if probe is None or probe >= self.next_checkpoint:
            self.tracer.extend(self.next_checkpoint)
        else:
            self.tracer.extend(probe, self.next_checkpoint)

    @property
    def skip_limit(self) -> int:
        """How far the cycle search may skip (it skips only once it has proven a cycle): to
        the next checkpoint, or with `to_budget`, to the run's budget."""
        if self.to_budget and self.cycles is not None:
            return self.run_budget
        return self.next_checkpoint

    @property
    def skipped_instructions(self) -> int:
        """Instructions of the last run accounted for by whole periods of an exact cycle."""
        return self.cycles.skipped if self.cycles is not None else 0

    def keep_going(self) -> bool:
        """At a stop of the tracer: resume (True) or end the run (False): the budget is
        spent, or at a checkpoint the run is stalled. Progress is a page written for the
        first time in this run, or being inside a bulk memory routine."""
        self._take_back()
        if self._keep_going():
            self._hand_over()
            return True
        return False

    def _keep_going(self) -> bool:
        tracer = self.tracer
        if tracer.instructions >= self.run_budget:
            return False
        if tracer.instructions < self.next_checkpoint:
            # a stop of the cycle search, not a checkpoint
            cycles = self.cycles
            assert cycles is not None
            tracer.extend(self.skip_limit)  # a skip may go up to there
            cycles.on_stop()
            if self.to_budget and cycles.proven:
                self.next_checkpoint = self.run_budget
            self._arm_next_stop()
            return True
        if not self.interval:
            return False
        pc = self.m.reg("rip")
        if self.written.wrote_new_pages() or any(lo <= pc < hi for lo, hi in self.bulk_ranges):
            self.next_checkpoint = min(tracer.instructions + self.interval, self.run_budget)
            if self.cycles is not None:
                self.cycles.after_checkpoint()
            self._arm_next_stop()
            return True
        self.stalled_at = tracer.instructions
        return False
