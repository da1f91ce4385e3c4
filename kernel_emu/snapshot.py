"""A snapshot of the whole machine just before the kernel first reads the ramdisk, and its
restore: every later input starts from it instead of booting again, and must not be able to
tell the difference.

A restore copies back only the pages the last run may have written (the caller says which,
from the dirty-page observer; None means all), drops the translated code of those pages that
hold code, and restores the CPU context.

Guest RAM is private anonymous host memory where the host offers it (RamBank.absent_zero),
and a page the host does not hold reads as zeros. The snapshot's zero pages start out given
back to the host; a zero fill of whole pages leaves such pages alone (the tracer's bulk
moves) and names them (`take_left_absent`), and the restore gives them back again instead of
clearing them. A loader that zeroes megabytes of fresh frames a run would otherwise have the
host allocate and clear each page, and the restore clear it a second time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kernel_emu.dirtylog import bits_and_indexes, mask_indexes, to_bits
from kernel_emu.firmware import FirmwareState
from kernel_emu.klog import KernelLog, parse_log
from kernel_emu.machine import PAGE, Machine
from kernel_emu.tracing import GuestTracer

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the restore copies page by page in Python
    native_walker = None  # type: ignore[assignment]

ZERO_PAGE = bytes(PAGE)


@dataclass(frozen=True)
class Snapshot:
    context: Any  # Unicorn's saved CPU context
    pages: list[list[bytes | None]]  # per bank, per page: its bytes, None when all zero
    firmware: FirmwareState
    log: bytes  # console output before the snapshot
    ports: tuple[tuple[str, int, int, int], ...]  # other port accesses, likewise
    instructions: int  # instructions run to get here
    # what the console's whole lines so far say: every run's log reads on from there
    log_base: KernelLog

    @classmethod
    def capture(cls, m: Machine, firmware: FirmwareState, tracer: GuestTracer) -> Snapshot:
        pages = []
        for bank in m.banks:
            data = bytes(bank.buffer)
            pages.append([page if (page := data[i:i + PAGE]) != ZERO_PAGE else None
                          for i in range(0, bank.size, PAGE)])
            if native_walker is not None and bank.absent_zero:
                every = to_bits((1 << bank.size // PAGE) - 1, bank.size // PAGE)
                native_walker.restore_pages(bank.buffer, pages[-1], every, every)
        console = tracer.console()
        lines = console[:console.rfind(b"\n") + 1].decode("utf-8", errors="replace")
        return cls(m.uc.context_save(), pages, firmware.copy(), console,
                   tuple(tracer.port_log()), tracer.instructions, parse_log(lines))

    def restore(self, m: Machine, written: dict[int, int | bytes] | None,
                code_masks: list[bytes], give_back: Sequence[bytes | None] = ()) -> None:
        """Put `m` back in the snapshot's state. `written`: bank index -> the pages that may
        differ from the snapshot, as a bit mask (bit i: page i) or a bitmap (bit i of byte
        i // 8); None: all of them. `code_masks`: per bank, the bitmap of its code pages.
        `give_back`: per bank, a bitmap of pages to give back to the host where the snapshot
        has zeros (the tracer's `take_left_absent`); with `written` None, every such page."""
        if written is None:
            every = [bytes(to_bits((1 << bank.size // PAGE) - 1, bank.size // PAGE))
                     for bank in m.banks]
            written = dict(enumerate(every))
            give_back = [bits if bank.absent_zero else None
                         for bits, bank in zip(every, m.banks, strict=True)]
        bitmaps = {region: to_bits(mask, m.banks[region].size // PAGE)
                   for region, mask in written.items()}
        # first: Unicorn finds the code to drop with a page walk under the run's CR3, which
        # sets Accessed bits in those tables; the copies below put them back
        for region, bits in bitmaps.items():
            base = m.banks[region].base
            for page in bits_and_indexes(bits, code_masks[region]):
                m.uc.ctl_remove_cache(base + page * PAGE, base + (page + 1) * PAGE)
        for region, bits in bitmaps.items():
            bank = m.banks[region]
            if native_walker is not None:
                back = give_back[region] if region < len(give_back) else None
                native_walker.restore_pages(bank.buffer, self.pages[region], bits,
                                            back if bank.absent_zero else None)
                continue
            saved = self.pages[region]
            for page in mask_indexes(bits):
                bank.view[page * PAGE:(page + 1) * PAGE] = saved[page] or ZERO_PAGE
        m.uc.context_restore(self.context)
        # a context restore keeps the softmmu TLB of the previous run; writing CR3 flushes it
        m.set_reg("cr3", m.reg("cr3"))


def code_masks(m: Machine, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """Per bank, a bitmap of the pages holding code in `ranges`: a restore of such a page must
    also drop the code Unicorn translated from it."""
    masks = [0] * len(m.banks)
    for lo, hi in ranges:
        for addr in range(lo & ~(PAGE - 1), hi, PAGE):
            for r, bank in enumerate(m.banks):
                if bank.contains(addr):
                    masks[r] |= 1 << (addr - bank.base) // PAGE
    return [bytes(to_bits(mask, bank.size // PAGE)) for mask, bank in zip(masks, m.banks,
                                                                         strict=True)]
