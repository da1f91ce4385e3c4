"""Observer: which pages a run wrote. Two questions are asked of it: by the snapshot restore
(which pages may differ from the snapshot?) and by the watchdog (did the guest write a page
it had not written before in this run, i.e. is it making progress?).

Snapshot runs under the firmware's identity page tables read the answers from the tables'
Dirty bits (`dirtylog.PageTableLog`), which keeps guest stores on Unicorn's fast path; full
boots, and kernels the log cannot serve, use the tracer's write hook instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from kernel_emu.dirtylog import CR0_PG, PageTableLog, dirty_count, index_mask
from kernel_emu.firmware import Firmware
from kernel_emu.machine import PAGE, Machine
from kernel_emu.tracing import WATCH_MAX, GuestTracer, WatchEvent

# bank index -> the pages of the bank, as a bit mask (bit i: page i) or a bitmap (bit i of
# byte i // 8, from the lowest)
PageMasks = dict[int, int | bytes]


def page_table_log(m: Machine, fw: Firmware, watched: Sequence[int]) -> PageTableLog | None:
    """The Dirty-bit log over the firmware's tables, if it can serve this kernel: CR3 must
    still hold those tables at the snapshot point, and the places that could change paging
    must fit in the tracer's watches beside the `watched` addresses (the allocator's)."""
    if m.reg("cr3") & ~0xFFF != fw.pml4 or not m.reg("cr0") & CR0_PG:
        return None
    try:
        log = PageTableLog(m, fw.pml4, fw.executable_ranges)
    except ValueError:
        return None
    if set(watched) & set(log.sites) or len(watched) + len(log.sites) > WATCH_MAX:
        return None
    return log


# the level whose entries without Accessed a checkpoint's Dirty count does not follow
CHECKPOINT_ACCESSED_LEVEL = 2


class WrittenPages:
    """The pages written by the runs on one machine. With a `log` (snapshot runs), the
    tracer must watch `paging_sites`: their events are taken out of the tracer's events and
    counted here (`paging_writes`), since they decide whether the log can vouch for a run."""

    def __init__(self, m: Machine, fw: Firmware, tracer: GuestTracer,
                 log: PageTableLog | None) -> None:
        self.m, self.fw, self.tracer = m, fw, tracer
        self.log = log
        self.paging_sites = frozenset(log.sites) if log is not None else frozenset()
        self.paging_writes = 0  # watched paging instructions run since the last restore
        self._written: set[tuple[int, int]] = set()  # pages the watchdog took from the hook
        self.checkpoint_count = 0  # Dirty leaves at the last checkpoint
        self._asked = False  # since_snapshot asked since the run, which answered _answer
        self._answer: PageMasks | None = None

    def start_run(self) -> None:
        self._written.clear()
        self.checkpoint_count = 0
        self._asked = False

    def take_events(self) -> list[WatchEvent]:
        """The tracer's watch events without those of the paging sites, which are counted."""
        events = self.tracer.take_events()
        sites = self.paging_sites
        if sites and events:
            kept = [e for e in events if e.address not in sites]
            self.paging_writes += len(events) - len(kept)
            events = kept
        return events

    def since_snapshot(self) -> PageMasks | None:
        """The pages the last run may have changed, per bank; None: all of them. Asked again
        before the next run, the same answer."""
        if not self._asked:
            self._answer, self._asked = self._since_snapshot(), True
        return self._answer

    def _since_snapshot(self) -> PageMasks | None:
        if self.log is None:
            crossings = self.tracer.identity_crossings
            dirty = self._written.union(self.tracer.take_dirty())
            # a crossing store's tail page was taken from the identity map: only valid if the
            # guest left the firmware's page tables alone
            tables = range(self.fw.pml4 // PAGE, self.fw.page_table_end // PAGE)
            if any(region < 0 for region, _ in dirty) or (
                    crossings and any(r == 0 and p in tables for r, p in dirty)):
                return None
            by_bank: dict[int, list[int]] = {}
            for region, page in dirty:
                by_bank.setdefault(region, []).append(page)
            return {region: index_mask(pages, self.m.banks[region].size // PAGE)
                    for region, pages in by_bank.items()}
        self.take_events()  # a run that ended in an exception left its events behind
        writes, self.paging_writes = self.paging_writes, 0
        # a dropped event may have been a paging site's
        pages = None if self.tracer.events_dropped else self.log.collect(writes)
        return None if pages is None else {0: pages}

    def wrote_new_pages(self) -> bool:
        """Whether the guest wrote a page since the last checkpoint that it had not written
        before in this run (without disturbing what the snapshot restore will need)."""
        if self.log is None:
            written = self._written
            new = [p for p in self.tracer.take_dirty() if p not in written]
            written.update(new)
            return bool(new)
        # the log clears Accessed in the page directories: tables not used since hold no
        # Dirty leaf, and skipping them makes a checkpoint ~10x cheaper
        count = dirty_count(self.m, self.fw.pml4, accessed_level=CHECKPOINT_ACCESSED_LEVEL)
        if count is None:
            return True  # the scan gave up: no verdict, so no early stop
        fresh = count > self.checkpoint_count
        self.checkpoint_count = count
        return fresh
