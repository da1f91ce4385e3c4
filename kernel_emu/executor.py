"""The Executor: boots the kernel (or restores the snapshot) and runs one input to a stop.

It puts together the machine (kernel_emu/machine.py) with the firmware
(kernel_emu/firmware.py), the observers (the tracer, the dirty-page and fault observers, the
allocator-call replay), the snapshot (kernel_emu/snapshot.py) and the watchdog
(kernel_emu/watchdog.py); after each run it hands the observations to the oracles
(kernel_emu/oracles.py), which make the Result.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from unicorn.unicorn_const import UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn.unicorn_py3.unicorn import UcError

from kernel_emu import causes, codescan, dirtypages, oracles
from kernel_emu.allocations import Allocation, AllocatorSites, replay
from kernel_emu.cycles import CycleFinder
from kernel_emu.dirtylog import PageTableLog, index_mask, to_bits
from kernel_emu.dirtypages import PageMasks, WrittenPages
from kernel_emu.elfview import load_segments
from kernel_emu.errors import HarnessError
from kernel_emu.firmware import DEBUG_PORT, FIRMWARE_BASE, FIRMWARE_END, SERVICE_PORT, Firmware
from kernel_emu.image import KernelImage, load_image
from kernel_emu.inputs import channel_for, encode_parts
from kernel_emu.machine import PAGE, Machine
from kernel_emu.observations import FaultObserver, RunObservations
from kernel_emu.profile import TargetProfile
from kernel_emu.result import Result, StopReason, Verdict
from kernel_emu.snapshot import Snapshot, code_masks
from kernel_emu.tracing import (
    EVENT_CAP,
    PORT_LOG_SIZE,
    GuestTracer,
    NativeTracer,
    PortConfig,
    attach_tracer,
)
from kernel_emu.watchdog import Watchdog

# what `restore` is given by default: the pages the dirty-page observer says were written
OBSERVED: Any = object()


class Executor:
    """Runs inputs on one kernel build. With `snapshot=True` the machine boots once to the
    snapshot point and is restored for every input; otherwise every input is a full boot.

    `coverage`: fill the guest edge-coverage map. `budget`: instructions per run (default:
    the profile's). `watchdog`: stop a run as stalled when it makes no progress for that many
    instructions. `native`, `fast_routines`, `skip_cycles`: the native tracer, the native bulk
    moves of memset/memcpy and the skipping of exact cycles; each changes only the speed.
    `cycles_to_budget`: a run the cycle search proves to be in an exact cycle is not stopped
    as stalled but goes on to its budget by whole periods (kernel_emu/watchdog.py): its Result
    is the one the budget alone gives, as if there were no watchdog, at no more cost.
    `lean`: the leaner run (the tracer judges the cycle search's arrivals itself and reads
    the frames of watch events from the RAM banks), which changes only the speed too; off
    to measure it.
    `explain`: when a run leaves a block header written over, make it again watching that
    header, so the finding (and its signature) names its last writer rather than where the run
    stopped. Off by default: a fuzzing job runs such inputs by the thousand, and the farm's
    jobs and triage must file a finding under one signature; `fuzzfarm boot` explains.
    `causes`: when a crashing input has another value than the standard one in a header
    field the ELF format fixes, boot it again with that field put right (on a second
    executor like this one, so that this one's machine stays as the input left it) and, if
    the crash goes away, file it under the field (kernel_emu.causes). Off in fuzzing jobs,
    which judge that once per signature and field.
    `details`: every Result in full; off, one with nothing to report leaves out its backtrace
    and heap blocks (kernel_emu.oracles.assess), which only show it: a fuzzing job's runs."""

    def __init__(self, profile: TargetProfile, *, snapshot: bool = True, native: bool = True,
                 coverage: bool = False, budget: int | None = None,
                 watchdog: int | None = None, fast_routines: bool = True,
                 skip_cycles: bool = True, explain: bool = False, lean: bool = True,
                 count_blocks: bool = True, causes: bool = True,
                 cycles_to_budget: bool = False, details: bool = True) -> None:
        self.profile = profile
        self.image: KernelImage = load_image(profile.image, profile.kernel.load_base)
        self.native, self.coverage = native, coverage
        self.budget = budget or profile.run.budget
        self.watchdog_interval = watchdog
        self.skip_cycles, self.fast_routines = skip_cycles, fast_routines
        self.cycles_to_budget = cycles_to_budget
        self.explain = explain
        self.lean = lean
        self.count_blocks = count_blocks
        self.details = details
        self.causes = causes
        self._second: Executor | None = None  # boots the inputs `causes` puts right
        # the pages a zero fill may leave alone on the Dirty bits' word (Tracer.trust_zeros)
        self._zero_pages: bytes | None = None
        self.runs_again = 0  # runs made again without trust_zeros: the log could not vouch
        self.notes: list[str] = []
        # seconds spent per phase of `run` (prepare, guest, oracles), for benchmarks
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)
        k, h = profile.kernel, profile.heap
        self.success_addr = self.image.symbol(k.success_symbol).address
        self.snapshot_addr = self.image.symbol(k.snapshot_symbol).address
        alloc, dealloc = self.image.symbol(h.alloc_symbol), self.image.symbol(h.dealloc_symbol)
        realloc = self.image.symbol(h.realloc_symbol) if h.realloc_symbol else None
        self.alloc_sites = AllocatorSites(
            alloc.address, codescan.return_sites(self.image, alloc.address, alloc.size),
            dealloc.address, h.convention,
            dealloc_returns=codescan.return_sites(self.image, dealloc.address, dealloc.size),
            realloc_entry=realloc.address if realloc else None,
            realloc_returns=codescan.return_sites(self.image, realloc.address, realloc.size)
            if realloc else (), realloc_takes_self=h.realloc_takes_self)
        self.bulk_ranges = codescan.bulk_ranges(self.image)
        # the bulk moves of memset/memcpy/memmove, and the strings written to the console, the
        # native tracer performs itself where that is provably the same (see
        # kernel_emu/native/bulk.h); without: the guest runs them
        self.bulk_sites = (codescan.bulk_sites(self.image, self.bulk_ranges) +
                           codescan.port_string_sites(self.image) if fast_routines else ())
        self.services = 0  # boot services performed in this run
        self.snapshot: Snapshot | None = None
        self.last_observations: RunObservations | None = None  # of the last run
        self._code_masks: list[bytes] = []
        self._machine_hooks: list[Callable[[Any], object]] = []
        self._fast_units = 0
        # whether every boot passes the snapshot point before it reads the input (None: not
        # known yet): a full boot may then count blocks from there (_emulate_from_boot)
        self._boot_prefix: bool | None = None
        self.use_snapshot = snapshot
        if snapshot:
            self._take_snapshot()

    # the machine and its observers -----------------------------------------------------
    def _new_machine(self, track_writes: bool = True) -> None:
        mem = self.profile.memory
        m = Machine([(0, mem.ram_size), (mem.ramdisk_base, mem.ramdisk_size)])
        fw = Firmware(m, self.profile, self.image)
        fw.install()
        faults = FaultObserver(m)
        m.uc.hook_add(UC_HOOK_INTR, faults.on_interrupt)
        tracer = attach_tracer(m.uc, [(b.base, b.size) for b in m.banks], native=self.native,
                               coverage=self.coverage,
                               ports=PortConfig(console=DEBUG_PORT, service=SERVICE_PORT,
                                                console_read_value=DEBUG_PORT),
                               track_writes=track_writes)
        tracer.watch(self.alloc_sites.addresses)
        # redzones a header wide around every allocation: a write past one is caught at the
        # next allocator call, before the allocator can carry the damage on
        sites = self.alloc_sites
        tracer.guard(self.profile.heap.header_size, sites.roles, sites.args)
        if isinstance(tracer, NativeTracer):
            tracer.state.direct_reads = self.lean  # frames read from the RAM banks
        if self.image.unwind:  # a PE image: its frames do not chain through rbp
            tracer.unwind(self.image.unwind)
        for attach in self._machine_hooks:
            attach(m.uc)
        m.uc.ctl_flush_tb()
        self.machine, self.firmware, self.tracer, self.faults = m, fw, tracer, faults
        self.channel = channel_for(m, fw, self.profile, self.image)
        self._observe_writes(None)

    def _observe_writes(self, log: PageTableLog | None) -> None:
        self.written = WrittenPages(self.machine, self.firmware, self.tracer, log)
        self.watchdog = Watchdog(self.machine, self.tracer, self.watchdog_interval,
                                 self.bulk_ranges, self.written, self.cycles_to_budget)
        # where the tracer already stops or acts: the cycle search never probes there
        self._no_stop = frozenset((*self.alloc_sites.addresses, *self.written.paging_sites,
                                   *(site.address for site in self.bulk_sites)))

    def _fast_forward(self, on: bool) -> None:
        """Arm the bulk sites on the current machine; only while no memory hook watches guest
        data (the snapshot boot's ramdisk read hook would miss the routines' reads)."""
        sites = self.bulk_sites if on and self.fast_routines else ()
        self.tracer.fast_forward(sites, [(b.base, b.size, b.address, b.absent_zero)
                                         for b in self.machine.banks])

    @property
    def _can_count_blocks(self) -> bool:
        return self.count_blocks and isinstance(self.tracer, NativeTracer)

    def _count_blocks(self) -> None:
        """Count instructions per block from here to the run's end (the success address) on
        the current machine. The firmware's boot-service stubs stop the guest right after an
        `out`: they run under the per-instruction hook."""
        if self._can_count_blocks:
            assert isinstance(self.tracer, NativeTracer)
            self.tracer.count_blocks(self.image.text_ranges, [(FIRMWARE_BASE, FIRMWARE_END)],
                                     self.success_addr)

    def add_machine_hook(self, attach: Callable[[Any], object]) -> None:
        """Call `attach(uc)` on the current machine and on every machine built later, so an
        observer (e.g. the fuzzer's compare hook) sees snapshot runs and full boots alike."""
        self._machine_hooks.append(attach)
        machine = getattr(self, "machine", None)
        if machine is not None:
            attach(machine.uc)
            machine.uc.ctl_flush_tb()

    # the snapshot ------------------------------------------------------------------------
    def _take_snapshot(self, use_page_tables: bool = True) -> None:
        self._new_machine(track_writes=not use_page_tables)
        m, fw, tracer = self.machine, self.firmware, self.tracer
        early_reads: list[int] = []

        def on_read(uc: Any, _access: int, addr: int, _size: int, _value: int, _u: Any) -> None:
            if not early_reads:
                early_reads.append(m.reg("rip"))

        hooks = [m.uc.hook_add(UC_HOOK_MEM_READ, on_read, None, lo, hi - 1)
                 for lo, hi in self.channel.ranges]
        m.uc.ctl_flush_tb()
        tracer.reset(self.budget)
        stop = self._emulate(until=self.snapshot_addr)
        for h in hooks:
            m.uc.hook_del(h)
        m.uc.ctl_flush_tb()
        if early_reads:
            self._no_snapshot(f"the kernel reads its input at "
                              f"{self.image.describe(early_reads[0])} before "
                              f"{self.profile.kernel.snapshot_symbol}")
            return
        if stop != StopReason.UNTIL:
            self._no_snapshot(f"the boot stopped ({stop}) before "
                              f"{self.profile.kernel.snapshot_symbol}")
            return
        if use_page_tables:
            log = dirtypages.page_table_log(m, fw, self.alloc_sites.addresses)
            if log is None:
                # boot again, this time with the write hook
                self._take_snapshot(use_page_tables=False)
                return
            log.arm()
            self._observe_writes(log)
            tracer.watch([*self.alloc_sites.addresses, *log.sites])
        else:
            tracer.take_dirty()
        self._fast_forward(True)
        # before the capture: setting up translates code, and the page walks set Accessed bits
        self._count_blocks()
        self.snapshot = Snapshot.capture(m, fw.state, tracer)
        tracer.identity_cr3 = fw.pml4
        if use_page_tables and self.written.log is not None and \
                self.written.log.maps_each_page_at_itself():
            self._zero_pages = self._guest_zero_pages(self.snapshot)
            tracer.trust_zeros(self._zero_pages)
        self._code_masks = code_masks(m, [*self.image.text_ranges,
                                          (FIRMWARE_BASE, FIRMWARE_END)])

    def _guest_zero_pages(self, snap: Snapshot) -> bytes:
        """The first bank's pages that the snapshot has as zeros and only the guest writes
        (not the input's), as a bitmap: what a zero fill may leave alone while the identity
        tables' Dirty bits say nothing stored to it since the restore (Tracer.trust_zeros)."""
        bank = self.machine.banks[0]
        zero = [page is None for page in snap.pages[0]]
        for lo, hi in self.channel.ranges:
            for addr in range(max(lo, bank.base) & ~(PAGE - 1), min(hi, bank.base + bank.size),
                              PAGE):
                zero[(addr - bank.base) // PAGE] = False
        count = len(zero)
        return bytes(to_bits(index_mask((i for i, z in enumerate(zero) if z), count), count))

    def _no_snapshot(self, why: str) -> None:
        self.use_snapshot = False
        self.snapshot = None
        self._boot_prefix = False
        self.notes.append(f"snapshot disabled, full boots instead: {why}")

    @property
    def snapshot_instructions(self) -> int:
        return self.snapshot.instructions if self.snapshot else 0

    def restore(self, written: PageMasks | None = OBSERVED) -> None:
        """Put the machine back in the snapshot's state and start a run. `written`: the pages
        that may differ from the snapshot (default: as the dirty-page observer says, which
        consumes what the last run left); None: all of them."""
        snap = self.snapshot
        assert snap is not None
        self.tracer.end_run()
        if written is OBSERVED:
            written = self.written.since_snapshot()
        elif written is None:
            self.channel.forget()  # every page is the snapshot's again, input included
        snap.restore(self.machine, written, self._code_masks, self.tracer.take_left_absent())
        self.firmware.state = snap.firmware.copy()
        self._start_run(self.budget - snap.instructions)

    # running -----------------------------------------------------------------------------
    def run(self, data: bytes) -> Result:
        """Boot `data` as bin/init. Raises HarnessError when the farm, not the kernel, failed."""
        payload = encode_parts(self.profile, data)
        try:
            result = self._run(data, payload)
            if self.causes and result.verdict == Verdict.CRASH:
                result = causes.attribute(data, result, self._boot_second)[0]
            return result
        except HarnessError:
            raise
        except Exception as e:  # a bug of ours must never pass for a kernel finding
            raise HarnessError(f"internal error while booting the input: "
                               f"{type(e).__name__}: {e}") from e

    def _boot_second(self, data: bytes) -> Result:
        if self._second is None:
            self._second = Executor(
                self.profile, snapshot=self.use_snapshot, native=self.native,
                coverage=False, budget=self.budget, watchdog=self.watchdog_interval,
                fast_routines=self.fast_routines, skip_cycles=self.skip_cycles,
                explain=self.explain, lean=self.lean, count_blocks=self.count_blocks,
                causes=False, cycles_to_budget=self.cycles_to_budget)
        return self._second.run(data)

    def _run(self, data: bytes, payload: tuple[bytes, ...],
             watch: tuple[int, int] | None = None) -> Result:
        """One run; `watch`: (address, size) whose last writer to record, in a run made again
        as the first (the guest itself doing the bulk moves, so that every write is seen; a
        skipped cycle repeats writes the hook saw in the periods before)."""
        t0 = time.perf_counter()
        segments = load_segments(data)
        if self.snapshot is not None:
            self.restore()
            base = self.snapshot.instructions
        else:
            # the pages a full boot writes matter only to a watchdog's verdict of progress:
            # without one, guest stores stay off the write hook (Unicorn's slow path)
            self._new_machine(track_writes=self.watchdog_interval is not None)
            self._fast_forward(True)
            self._start_run(self.budget)
            base = 0
        self.channel.place(*payload)
        writers: dict[int, list[str]] = {}
        hook = self._watch_writes(watch, writers) if watch is not None else None
        t1 = time.perf_counter()
        try:
            stop = self._emulate_from_boot() if self.snapshot is None else \
                self._emulate(until=self.success_addr)
        finally:
            if hook is not None:
                self.machine.uc.hook_del(hook)
                self.machine.uc.ctl_flush_tb()
                self._fast_forward(True)
        t2 = time.perf_counter()
        tracer, image = self.tracer, self.image
        if watch is None:
            self._fast_units = tracer.fast_units
        tracer.check_guards()
        freed: list[Allocation] = []
        events, live = replay(self.written.take_events(), self.alloc_sites,
                              lambda a, ret: image.describe(a, return_address=ret),
                              tracer.take_guard_hits(), freed)
        if tracer.zeros_taken and self.written.since_snapshot() is None:
            # zero fills left pages alone on the word of Dirty bits that the log cannot
            # vouch for in this run: the same run again, every fill writing its pages
            return self._run_writing_zeros(data, payload, watch)
        faults = self.faults
        observed = RunObservations(
            machine=self.machine, stop=stop, instructions=base + tracer.instructions,
            fault=faults.fault, uc_error=faults.uc_error, events=events,
            console=self.console(), ports=self.port_accesses(),
            recent_blocks=tracer.recent_blocks, stalled_at=self.watchdog.stalled_at,
            budget=self.budget, efi_main_status=self.firmware.state.efi_main_status,
            firmware_console=self.firmware.state.console, writers=writers, live=live,
            freed=freed, events_dropped=tracer.events_dropped, file=data,
            log_base=self.snapshot.log_base if self.snapshot is not None else None)
        self.last_observations = observed
        result = oracles.assess(observed, image, self.profile, segments, self.details)
        if watch is None and self.explain:
            damaged = oracles.heap_damage(observed, image, self.profile, result)
            if damaged is not None:
                # a block header found written over: the same run again, watching it
                return self._run(data, payload, watch=damaged)
        result.of_input(data)
        result.snapshot = self.snapshot is not None
        result.notes = list(self.notes) + [
            f"the kernel asked the firmware for {name}, which this machine does not provide"
            for name in dict.fromkeys(self.firmware.state.unsupported)]
        if observed.events_dropped:
            result.notes.append(
                f"the allocator's calls made {observed.events_dropped} events more than the "
                f"tracer's log holds ({EVENT_CAP}): no leak was judged, and heap damage was "
                f"charged to no allocation")
        t3 = time.perf_counter()
        phases = self.phase_seconds
        phases["prepare"] += t1 - t0
        phases["guest"] += t2 - t1
        phases["oracles"] += t3 - t2
        return result

    def _run_writing_zeros(self, data: bytes, payload: tuple[bytes, ...],
                           watch: tuple[int, int] | None) -> Result:
        self.runs_again += 1
        self.tracer.trust_zeros(None)
        try:
            return self._run(data, payload, watch)
        finally:
            self.tracer.trust_zeros(self._zero_pages)

    def _watch_writes(self, watch: tuple[int, int], writers: dict[int, list[str]]) -> Any:
        """Record, for the range `watch`, the frames of the last instruction that writes into
        it; the tracer's bulk moves are turned off so that the guest does every write."""
        m, image = self.machine, self.image
        start, size = watch

        def on_write(_uc: Any, _access: int, _addr: int, _size: int, _value: int,
                     _user: Any) -> None:
            writers[start] = oracles.backtrace(m, image)

        self._fast_forward(False)
        hook = m.uc.hook_add(UC_HOOK_MEM_WRITE, on_write, None, start, start + size - 1)
        m.uc.ctl_flush_tb()
        return hook

    def _start_run(self, run_budget: int) -> None:
        self.services = 0
        self.faults.reset()
        cycles = None
        if self.skip_cycles and self.written.log is not None and self.snapshot is not None:
            watchdog = self.watchdog
            cycles = CycleFinder(self.machine, self.tracer, self.firmware.pml4, self._no_stop,
                                 lambda: watchdog.skip_limit, lambda: self.services,
                                 native_arrivals=self.lean)
        self.watchdog.start_run(run_budget, cycles)

    def _emulate_from_boot(self) -> StopReason:
        """A full boot: to the snapshot point per instruction, as the snapshot's boot runs,
        and from there per block (the code before it is not all fixed: an ELF build's boot
        copies code, for one)."""
        if not self._can_count_blocks or not self._boots_share_a_prefix():
            return self._emulate(until=self.success_addr)
        stop = self._emulate(until=self.snapshot_addr)
        if stop != StopReason.UNTIL:
            return stop
        self._count_blocks()
        return self._emulate(until=self.success_addr)

    def _boots_share_a_prefix(self) -> bool:
        """Whether this kernel's boot reaches the snapshot point before it reads the input,
        so that every full boot, whatever its input, passes there first (the run must not
        be stopped at a point it would never reach, and go past the success address). Learnt
        once, by taking a snapshot."""
        if self._boot_prefix is None:
            probe = Executor(self.profile, native=self.native, fast_routines=self.fast_routines,
                             count_blocks=False, causes=False)
            self._boot_prefix = probe.snapshot is not None
        return self._boot_prefix

    def _emulate(self, until: int) -> StopReason:
        """Run to `until`; why the guest stopped."""
        stop = run_guest(self.machine, self.tracer, self.faults, self.firmware, until,
                         self.watchdog.keep_going, self._served)
        if stop is None:
            pc = self.machine.reg("rip")
            raise HarnessError(f"emulation stopped at {self.image.describe(pc)} for no known "
                               f"reason")
        return stop

    def _served(self) -> None:
        self.services += 1
        if self._zero_pages is not None and self.snapshot is not None:
            # the firmware writes guest memory without a Dirty bit, and the restore cannot
            # see those writes either: a page it wrote may keep its bytes into later runs,
            # where a zero fill must not take the identity tables' word that it holds zeros
            self._zero_pages = None
            self.tracer.trust_zeros(None)

    # what the last run left --------------------------------------------------------------
    @property
    def stalled_at(self) -> int:
        """The instruction count at which the watchdog called the last run stalled, or 0."""
        return self.watchdog.stalled_at

    @property
    def fast_units(self) -> int:
        """Iterations of the guest's bulk moves performed natively in the last run (not in
        the run made again to watch a damaged header, which performs none)."""
        return self._fast_units

    @property
    def skipped_instructions(self) -> int:
        """Instructions of the last run accounted for by whole periods of an exact cycle."""
        return self.watchdog.skipped_instructions

    def coverage_map(self) -> bytes:
        """The guest edge-coverage map of the last run (all zero unless `coverage=True`)."""
        return bytes(self.tracer.coverage())

    def console(self) -> bytes:
        """Everything the kernel wrote to its debug console in this boot."""
        prefix = self.snapshot.log if self.snapshot is not None else b""
        return prefix + self.tracer.console()

    def port_accesses(self) -> list[tuple[str, int, int, int]]:
        """Accesses to ports other than the console and the service port in this boot."""
        prefix = self.snapshot.ports if self.snapshot is not None else ()
        return [*prefix, *self.tracer.port_log()][:PORT_LOG_SIZE]


__all__ = ["OBSERVED", "Executor", "GuestTracer"]


def _settle(m: Machine, tracer: NativeTracer) -> None:
    """A fault left the block it interrupted counted whole: count what ran of it."""
    if not tracer.settle(m.reg("rip")):
        raise HarnessError(f"the instruction count of this run is not exact: the block "
                           f"interrupted at {m.reg('rip'):#x} cannot be counted back "
                           f"(--no-block-counting counts per instruction)")


def run_guest(m: Machine, tracer: GuestTracer, faults: FaultObserver, firmware: Firmware,
              until: int, keep_going: Callable[[], bool] = lambda: False,
              served: Callable[[], object] = lambda: None) -> StopReason | None:
    """Run the guest to `until`, performing the boot services it asks for; why it stopped,
    or None when nothing explains it (an exception the CPU could not deliver, say).

    A boot-service stub stops the guest right after its `out`; the firmware performs the
    service (`served` is told) and the guest resumes. A spent budget with no fault lets the
    guest on while `keep_going()` says so (the watchdog's checkpoints)."""
    native = tracer if isinstance(tracer, NativeTracer) else None
    counting = native if native is not None and native.counts_blocks else None
    if counting is not None and until != counting.until:
        raise HarnessError(f"the tracer counts blocks for runs to {counting.until:#x}, "
                           f"not {until:#x}")
    if native is not None:
        # the native tracer stops the guest there itself: Unicorn's `until` costs a
        # translation of the block before it in every run that reaches it
        native.exit_at(until)
    while True:
        try:
            m.uc.emu_start(m.reg("rip"), until)
        except UcError as e:
            faults.on_emulator_error(e)
            if counting is not None:
                _settle(m, counting)
            return StopReason.UC_ERROR
        request = tracer.take_service()
        if tracer.budget_exhausted and faults.fault is None and keep_going():
            if request is None:
                continue
        elif request is None or faults.fault is not None or tracer.budget_exhausted:
            break
        firmware.service(request)
        served()
        if firmware.state.efi_main_status is not None:
            return StopReason.EFI_RETURN
        if native is not None and native.exited:
            break  # as `until` would end the run at once when it resumed there
    pc = m.reg("rip")
    if counting is not None:
        if faults.fault is not None:
            _settle(m, counting)
        if counting.count_inexact:
            raise HarnessError(f"the instruction count of this run is not exact (counting "
                               f"per block, stopped at {pc:#x}); --no-block-counting counts "
                               f"per instruction")
    if faults.fault is not None:
        return StopReason.FAULT
    if tracer.budget_exhausted:
        return StopReason.BUDGET
    if pc == until:
        return StopReason.UNTIL
    if m.read(pc - 1, 1) == b"\xf4":
        return StopReason.HALT
    return None
