"""Executors: boot the kernel (or restore the snapshot) and run one input to a stop.

Observers collect the debug console, allocator calls and faults; `oracles.assess` turns them
into a Result.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capstone
from unicorn import UC_HOOK_INTR, UC_HOOK_MEM_READ, UcError

from kernel_emu import oracles
from kernel_emu.allocations import AllocatorSites, replay
from kernel_emu.cycles import CycleFinder
from kernel_emu.dirtylog import CR0_PG, PageTableLog, dirty_count, index_mask, mask_indexes
from kernel_emu.elfview import load_segments
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.firmware import (
    DEBUG_PORT,
    FIRMWARE_BASE,
    FIRMWARE_END,
    SERVICE_PORT,
    Firmware,
    FirmwareState,
)
from kernel_emu.image import KernelImage, load_image
from kernel_emu.machine import PAGE, Machine
from kernel_emu.profile import TargetProfile
from kernel_emu.ramdisk import RamdiskTooLarge, build_init_ramdisk
from kernel_emu.result import Finding, Result
from kernel_emu.tracing import (
    PORT_LOG_SIZE,
    WATCH_MAX,
    BulkSite,
    GuestTracer,
    PortConfig,
    WatchEvent,
    attach_tracer,
)

try:
    from kernel_emu import _walk
except ImportError:  # not built: the restore copies page by page in Python
    _walk = None

ZERO_PAGE = bytes(PAGE)
# routines whose long loops are progress (every iteration moves on through memory)
BULK_ROUTINES = ("memset", "memcpy", "memmove")
# the instructions of those routines the native tracer may fast-forward, as encoded (REP,
# REX.W and the opcode, no segment or address-size override)
BULK_ENCODINGS = {b"\xf3\x48\xab": "stosq", b"\xf3\x48\xa5": "movsq"}


@dataclass
class Fault:
    vector: int
    pc: int
    cr2: int
    rsp: int
    rbp: int


@dataclass
class Observations:
    """Everything seen during one run, in the order it happened."""

    log_prefix: bytes = b""  # console output before the snapshot
    ports_prefix: tuple[tuple[str, int, int, int], ...] = ()  # other ports, likewise
    events: list[Finding] = field(default_factory=list)
    fault: Fault | None = None
    uc_error: str = ""


@dataclass
class Snapshot:
    context: Any
    pages: list[list[bytes | None]]  # per bank, per page: its bytes, None when all zero
    firmware: FirmwareState
    log: bytes
    ports: tuple[tuple[str, int, int, int], ...]
    instructions: int


class Executor:
    """Runs inputs on one kernel build. With `snapshot=True` the machine boots once to the
    snapshot point and is restored for every input; otherwise every input is a full boot."""

    def __init__(self, profile: TargetProfile, *, snapshot: bool = True, native: bool = True,
                 coverage: bool = False, budget: int | None = None,
                 watchdog: int | None = None, fast_routines: bool = True,
                 skip_cycles: bool = True) -> None:
        self.profile = profile
        self.image: KernelImage = load_image(profile.image)
        self.native = native
        self.coverage = coverage
        self.budget = budget or profile.run.budget
        # Every `watchdog` instructions, a run whose guest is not inside a bulk memory routine
        # (zeroing or copying a large segment) is stopped as stalled: a fuzzer's early verdict
        # on a loop that makes no progress, instead of spending the whole budget on it.
        self.watchdog = watchdog
        self.stalled_at = 0
        self._run_budget = self.budget
        self.next_checkpoint = self.budget
        # A run whose whole state repeats is moved on by whole periods, up to each watchdog
        # checkpoint or to the budget (kernel_emu/cycles.py): the same Result, without running
        # them. Off: run them all.
        self.skip_cycles = skip_cycles
        self._cycles: CycleFinder | None = None
        self.services = 0  # boot services performed in this run
        # pages the watchdog took from the tracer's dirty set during this run
        self._written: set[tuple[int, int]] = set()
        self._dirty_count = 0
        self.notes: list[str] = []
        k, h = profile.kernel, profile.heap
        self.success_addr = self.image.symbol(k.success_symbol).address
        self.snapshot_addr = self.image.symbol(k.snapshot_symbol).address
        alloc = self.image.symbol(h.alloc_symbol)
        self.alloc_sites = AllocatorSites(alloc.address,
                                          tuple(self._return_sites(alloc.address, alloc.size)),
                                          self.image.symbol(h.dealloc_symbol).address)
        self.free_list_addr = self.image.symbol(h.free_list_symbol).address
        self._bulk_ranges = [(sym.address, sym.address + sym.size)
                             for sym in (self.image.find_symbol(n) for n in BULK_ROUTINES)
                             if sym is not None and sym.size > 0]
        # The bulk moves of memset/memcpy/memmove run natively where that is provably the same
        # (native tracer only; see kernel_emu/native/bulk.h). Off: the guest runs every one.
        self.fast_routines = fast_routines
        self._bulk_sites = self._find_bulk_sites() if fast_routines else []
        self.kstack_sym_addr = self.image.symbol(k.stack_base_symbol).address
        self._snapshot: Snapshot | None = None
        self._machine_hooks: list[Callable[[Any], object]] = []
        # how a snapshot restore learns the written pages: the page tables' Dirty bits, or
        # (None) the tracer's write hook, which keeps every guest store on the slow path
        self._log: PageTableLog | None = None
        self._paging_sites: frozenset[int] = frozenset()
        self._paging_writes = 0
        self._ramdisk_size = 0
        self.use_snapshot = snapshot
        # seconds spent per phase of `run` (prepare, guest, oracles), for benchmarks
        self.phase_seconds: Counter[str] = Counter()
        if snapshot:
            self._take_snapshot()

    # set-up ------------------------------------------------------------------------------
    def _return_sites(self, start: int, size: int) -> list[int]:
        seg = next((s for s in self.image.segments if s.vaddr <= start < s.end), None)
        if seg is None or size <= 0:
            raise HarnessError(f"allocator symbol at {start:#x} has no code in the image")
        code = seg.data[start - seg.vaddr:start - seg.vaddr + size]
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        sites = [i.address for i in md.disasm(code, start) if i.mnemonic == "ret"]
        if not sites:
            raise HarnessError("no return instruction found in the allocator")
        return sites

    def _find_bulk_sites(self) -> list[BulkSite]:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        sites = []
        for lo, hi in self._bulk_ranges:
            seg = next((s for s in self.image.segments if s.vaddr <= lo and hi <= s.end), None)
            if seg is None or not seg.flags & 1:
                continue
            code = seg.data[lo - seg.vaddr:hi - seg.vaddr]
            sites.extend(BulkSite(i.address, BULK_ENCODINGS[bytes(i.bytes)])
                         for i in md.disasm(code, lo) if bytes(i.bytes) in BULK_ENCODINGS)
        return sites

    def _fast_forward(self, on: bool) -> None:
        """Arm the bulk sites on the current machine; only while no memory hook watches guest
        data (the snapshot boot's ramdisk read hook would miss the routines' reads)."""
        sites = self._bulk_sites if on and self.fast_routines else []
        self.tracer.fast_forward(sites, [(b.base, b.size, b.address) for b in self.m.banks])

    @property
    def fast_units(self) -> int:
        """Iterations of the guest's bulk moves performed natively in the last run."""
        return self.tracer.fast_units

    def _new_machine(self, track_writes: bool = True) -> tuple[Machine, Firmware, GuestTracer]:
        mem = self.profile.memory
        m = Machine([(0, mem.ram_size), (mem.ramdisk_base, mem.ramdisk_size)])
        fw = Firmware(m, self.profile, self.image)
        fw.install()
        uc = m.uc
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        tracer = attach_tracer(uc, [(b.base, b.size) for b in m.banks], native=self.native,
                               coverage=self.coverage,
                               ports=PortConfig(console=DEBUG_PORT, service=SERVICE_PORT,
                                                console_read_value=DEBUG_PORT),
                               track_writes=track_writes)
        tracer.watch(self.alloc_sites.addresses)
        for attach in self._machine_hooks:
            attach(uc)
        uc.ctl_flush_tb()
        self.m, self.fw, self.tracer = m, fw, tracer
        self.obs = Observations()
        return m, fw, tracer

    def _take_snapshot(self, use_page_tables: bool = True) -> None:
        m, fw, tracer = self._new_machine(track_writes=not use_page_tables)
        early_reads: list[int] = []

        def on_read(uc: Any, _access: int, addr: int, _size: int, _value: int, _u: Any) -> None:
            if not early_reads:
                early_reads.append(m.reg("rip"))

        hooks = [m.uc.hook_add(UC_HOOK_MEM_READ, on_read, None, lo, hi - 1)
                 for lo, hi in fw.ramdisk_ranges]
        m.uc.ctl_flush_tb()
        tracer.reset(self.budget)
        stop = self._emulate(until=self.snapshot_addr)
        for h in hooks:
            m.uc.hook_del(h)
        m.uc.ctl_flush_tb()
        if early_reads:
            self._no_snapshot(f"the kernel reads the ramdisk at "
                              f"{self.image.describe(early_reads[0])} before "
                              f"{self.profile.kernel.snapshot_symbol}")
            return
        if stop != "until":
            self._no_snapshot(f"the boot stopped ({stop}) before "
                              f"{self.profile.kernel.snapshot_symbol}")
            return
        if use_page_tables:
            log = self._page_table_log()
            if log is None:
                # boot again, this time with the write hook
                self._take_snapshot(use_page_tables=False)
                return
            log.arm()
            self._log = log
            self._paging_sites = frozenset(log.sites)
            tracer.watch([*self.alloc_sites.addresses, *log.sites])
        else:
            tracer.take_dirty()
        pages = []
        for bank in m.banks:
            data = bytes(bank.buffer)
            pages.append([page if (page := data[i:i + PAGE]) != ZERO_PAGE else None
                          for i in range(0, bank.size, PAGE)])
        self._snapshot = Snapshot(m.uc.context_save(), pages, fw.state.copy(),
                                  tracer.console(), tuple(tracer.port_log()),
                                  tracer.instructions)
        self._fast_forward(True)
        tracer.identity_cr3 = fw.pml4
        self._code_ranges = [*self.image.text_ranges, (FIRMWARE_BASE, FIRMWARE_END)]
        # per bank, a mask of the pages whose translated code a restore must drop
        self._code_masks = [0] * len(m.banks)
        for lo, hi in self._code_ranges:
            for addr in range(lo & ~(PAGE - 1), hi, PAGE):
                for r, bank in enumerate(m.banks):
                    if bank.contains(addr):
                        self._code_masks[r] |= 1 << (addr - bank.base) // PAGE

    def add_machine_hook(self, attach: Callable[[Any], object]) -> None:
        """Call `attach(uc)` on the current machine and on every machine built later, so an
        observer (e.g. the fuzzer's compare hook) sees snapshot runs and full boots alike."""
        self._machine_hooks.append(attach)
        machine = getattr(self, "m", None)
        if machine is not None:
            attach(machine.uc)
            machine.uc.ctl_flush_tb()

    def _page_table_log(self) -> PageTableLog | None:
        """The Dirty-bit log over the firmware's tables, if it can serve this kernel: CR3 must
        still hold those tables at the snapshot point, and the places that could change paging
        must fit in the tracer's watches next to the allocator's."""
        m, fw = self.m, self.fw
        if m.reg("cr3") & ~0xFFF != fw.pml4 or not m.reg("cr0") & CR0_PG:
            return None
        try:
            log = PageTableLog(m, fw.pml4, fw.executable_ranges)
        except ValueError:
            return None
        alloc = set(self.alloc_sites.addresses)
        if alloc & set(log.sites) or len(alloc) + len(log.sites) > WATCH_MAX:
            return None
        return log

    def _no_snapshot(self, why: str) -> None:
        self.use_snapshot = False
        self._snapshot = None
        self.notes.append(f"snapshot disabled, full boots instead: {why}")

    @property
    def snapshot_instructions(self) -> int:
        return self._snapshot.instructions if self._snapshot else 0

    # running -----------------------------------------------------------------------------
    def run(self, data: bytes) -> Result:
        """Boot `data` as bin/init. Raises HarnessError when the farm, not the kernel, failed."""
        try:
            ramdisk = build_init_ramdisk(data)
        except RamdiskTooLarge as e:
            raise InputError(str(e)) from e
        try:
            return self._run(data, ramdisk)
        except HarnessError:
            raise
        except Exception as e:  # a bug of ours must never pass for a kernel finding
            raise HarnessError(f"internal error while booting the input: "
                               f"{type(e).__name__}: {e}") from e

    def _run(self, data: bytes, ramdisk: bytes) -> Result:
        t0 = time.perf_counter()
        segments = load_segments(data)
        if self._snapshot is not None:
            self._restore()
            base = self._snapshot.instructions
        else:
            self._new_machine()
            self._fast_forward(True)
            self._start_run(self.budget)
            self._ramdisk_size = 0
            base = 0
        self.fw.hand_over_ramdisk(ramdisk, self._ramdisk_size)
        self._ramdisk_size = len(ramdisk)
        t1 = time.perf_counter()
        stop = self._emulate(until=self.success_addr)
        t2 = time.perf_counter()
        self.obs.events, _ = replay(self._take_events(), self.alloc_sites,
                                    lambda a, ret: self.image.describe(a, return_address=ret))
        result = oracles.assess(self, segments, stop, base + self.tracer.instructions)
        result.input_sha256 = hashlib.sha256(data).hexdigest()
        result.snapshot = self._snapshot is not None
        result.notes = list(self.notes)
        t3 = time.perf_counter()
        phases = self.phase_seconds
        phases["prepare"] += t1 - t0
        phases["guest"] += t2 - t1
        phases["oracles"] += t3 - t2
        return result

    def _take_events(self) -> list[WatchEvent]:
        """The tracer's watch events without those of the paging sites, which are counted."""
        events = self.tracer.take_events()
        sites = self._paging_sites
        if sites and any(e.address in sites for e in events):
            self._paging_writes += sum(e.address in sites for e in events)
            events = [e for e in events if e.address not in sites]
        return events

    def _written_pages(self) -> dict[int, int] | None:
        """Bank index -> a bit mask of the pages (bit i: page i of the bank) the last run may
        have changed; None: all of them."""
        if self._log is None:
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
        self._take_events()  # a run that ended in an exception left its events behind
        writes, self._paging_writes = self._paging_writes, 0
        # a dropped event may have been a paging site's
        pages = None if self.tracer.events_dropped else self._log.collect(writes)
        return None if pages is None else {0: pages}

    def _restore(self) -> None:
        snap = self._snapshot
        assert snap is not None
        m = self.m
        dirty = self._written_pages()
        if dirty is None:
            dirty = {r: (1 << bank.size // PAGE) - 1 for r, bank in enumerate(m.banks)}
        # first: Unicorn finds the code to drop with a page walk under the run's CR3, which
        # sets Accessed bits in those tables; the copies below put them back
        for region, mask in dirty.items():
            base = m.banks[region].base
            for page in mask_indexes(mask & self._code_masks[region]):
                m.uc.ctl_remove_cache(base + page * PAGE, base + (page + 1) * PAGE)
        for region, mask in dirty.items():
            bank = m.banks[region]
            if _walk is not None:
                _walk.restore_pages(bank.buffer, snap.pages[region],
                                    mask.to_bytes((bank.size // PAGE + 7) // 8, "little"))
                continue
            saved = snap.pages[region]
            for page in mask_indexes(mask):
                bank.view[page * PAGE:(page + 1) * PAGE] = saved[page] or ZERO_PAGE
        m.uc.context_restore(snap.context)
        # a context restore keeps the softmmu TLB of the previous run; writing CR3 flushes it
        m.set_reg("cr3", m.reg("cr3"))
        self.fw.state = snap.firmware.copy()
        self.obs = Observations(log_prefix=snap.log, ports_prefix=snap.ports)
        self._start_run(self.budget - snap.instructions)

    def _start_run(self, run_budget: int) -> None:
        """Reset the tracer for a run of `run_budget` instructions and arm its first stop."""
        self._run_budget = run_budget
        self.stalled_at = 0
        self._written.clear()
        self._dirty_count = 0
        self.services = 0
        self.next_checkpoint = min(run_budget, self.watchdog) if self.watchdog else run_budget
        self._cycles = CycleFinder(self) if (self.skip_cycles and self._log is not None
                                             and self._snapshot is not None) else None
        self.tracer.reset(self.next_checkpoint)
        self._arm_next_stop()

    def _arm_next_stop(self) -> None:
        """Stop at the next checkpoint, or before it at the cycle search's next probe, which
        is not counted in bulk-move iterations (a run loading megabytes is no cycle)."""
        probe = self._cycles.next_probe if self._cycles is not None else None
        if probe is None or probe >= self.next_checkpoint:
            self.tracer.extend(self.next_checkpoint)
        else:
            self.tracer.extend(probe, self.next_checkpoint)

    @property
    def skipped_instructions(self) -> int:
        """Instructions of the last run accounted for by whole periods of an exact cycle."""
        return self._cycles.skipped if self._cycles is not None else 0

    def _keep_going(self) -> bool:
        """At a watchdog stop: resume (True) or call the run stalled (False). Progress is a
        page written for the first time in this run, or being inside a bulk memory routine."""
        tracer = self.tracer
        if tracer.instructions >= self._run_budget:
            return False
        if tracer.instructions < self.next_checkpoint:
            # a stop of the cycle search, not a checkpoint
            assert self._cycles is not None
            tracer.extend(self.next_checkpoint)  # a skip may go up to the checkpoint
            self._cycles.on_stop()
            self._arm_next_stop()
            return True
        if not self.watchdog:
            return False
        pc = self.m.reg("rip")
        if self._wrote_new_pages() or any(lo <= pc < hi for lo, hi in self._bulk_ranges):
            self.next_checkpoint = min(tracer.instructions + self.watchdog, self._run_budget)
            if self._cycles is not None:
                self._cycles.after_checkpoint()
            self._arm_next_stop()
            return True
        self.stalled_at = tracer.instructions
        return False

    def _wrote_new_pages(self) -> bool:
        """Whether the guest wrote a page since the last checkpoint that it had not written
        before in this run (without disturbing what the snapshot restore will need)."""
        if self._log is None or self._snapshot is None:
            written = self._written
            fresh = [p for p in self.tracer.take_dirty() if p not in written]
            written.update(fresh)
            return bool(fresh)
        # the log clears Accessed in the page directories: tables not used since hold no
        # Dirty leaf, and skipping them makes a checkpoint ~10x cheaper
        count = dirty_count(self.m, self.fw.pml4, accessed_level=2)
        if count is None:
            return True  # the scan gave up: no verdict, so no early stop
        fresh = count > self._dirty_count
        self._dirty_count = count
        return fresh

    def _emulate(self, until: int) -> str:
        """Run to `until`; the stop reason: until, fault, budget, halt, efi-return, uc-error.

        A boot-service stub stops the guest right after its `out`; the firmware performs the
        service and the guest resumes."""
        m, tracer = self.m, self.tracer
        while True:
            try:
                m.uc.emu_start(m.reg("rip"), until)
            except UcError as e:
                if self.obs.fault is None:
                    self.obs.fault = Fault(-1, m.reg("rip"), 0, m.reg("rsp"), m.reg("rbp"))
                    self.obs.uc_error = str(e)
                return "uc-error"
            request = tracer.take_service()
            if tracer.budget_exhausted and self.obs.fault is None and self._keep_going():
                if request is None:
                    continue
            elif request is None or self.obs.fault is not None or tracer.budget_exhausted:
                break
            self.fw.service(request)
            self.services += 1
            if self.fw.state.efi_main_status is not None:
                return "efi-return"
        pc = m.reg("rip")
        if self.obs.fault is not None:
            return "fault"
        if tracer.budget_exhausted:
            return "budget"
        if pc == until:
            return "until"
        if m.read(pc - 1, 1) == b"\xf4":
            return "halt"
        raise HarnessError(f"emulation stopped at {self.image.describe(pc)} for no known reason")

    def coverage_map(self) -> bytes:
        """The guest edge-coverage map of the last run (all zero unless `coverage=True`)."""
        return bytes(self.tracer.coverage())

    def console(self) -> bytes:
        """Everything the kernel wrote to its debug console in this boot."""
        return self.obs.log_prefix + self.tracer.console()

    def port_accesses(self) -> list[tuple[str, int, int, int]]:
        """Accesses to ports other than the console and the service port in this boot."""
        return [*self.obs.ports_prefix, *self.tracer.port_log()][:PORT_LOG_SIZE]

    # observers ---------------------------------------------------------------------------
    def _on_interrupt(self, uc: Any, vector: int, _user: Any) -> None:
        m = self.m
        if self.obs.fault is None:
            self.obs.fault = Fault(vector, m.reg("rip"), m.reg("cr2") if vector == 14 else 0,
                                   m.reg("rsp"), m.reg("rbp"))
        uc.emu_stop()

    def kernel_stack_base(self) -> int:
        return struct.unpack("<Q", self.m.read(self.kstack_sym_addr, 8))[0]
