"""The race's AFL++ competitor: AFL++'s fuzzer on the exported snapshot, with the coverage
collected by this harness (a Unicorn block hook in Python), not by unicornafl.

Run by afl-fuzz in Unicorn mode with a competitor's own interpreter (it imports only the
standard library, `unicorn` and `resume.py` beside it):

    afl-fuzz -U -i SEEDS -o OUT -- python afl_harness.py EXPORT @@

What is AFL++'s and what is not: afl-fuzz does everything a fuzzer does (queue, scheduling,
mutations, calibration, crash and hang triage, its timeouts). The harness is the target side
that unicornafl would be: it speaks AFL++'s fork server protocol (the classic one: a hello on
fd 199, then per input a word from afl-fuzz on fd 198, a child forked, its pid and wait status
on fd 199) and writes edge coverage into AFL++'s shared-memory map (`__AFL_SHM_ID`) the way
AFL's QEMU and Unicorn modes do: per basic block `cur = (pc >> 4 ^ pc << 8) & (size - 1)`,
`map[cur ^ prev]++`, `prev = cur >> 1`. It has no compare splitting (unicornafl's CompCov) and
runs its hook in Python, so its executions are slower than unicornafl's would be.

Why not unicornafl: no release on PyPI can run this snapshot. 2.1.0 (the newest) indexes
AFL++'s 64 KiB map with an unmasked 32-bit hash of the block's address (the mask came upstream
after the release), so the target dies with SIGSEGV on its first block; 2.0.0 to 2.0.2 carry
their own Unicorn, 2.0.0-rc6, whose x86 CPUs offer no NX (CPUID 0x80000001 EDX bit 20 clear,
EFER.NXE does not stick), and the snapshot's page tables set NX bits, so its first instruction
takes a page fault. See the race section of docs/performance.md.

The harness resumes the exported snapshot (resume.py) once, in the fork server; every input
runs in a forked copy of that process (memory and CPU as the snapshot left them). A child
reads the input from the file afl-fuzz wrote, writes it as the exported input layout says (an
input too large for the channel is not run) and runs it to a stop within the instruction
budget. The run is a crash, reported to AFL++ by the child aborting (SIGABRT), when resume.py's
outcome is one: panic, fault or hang (the budget of instructions spent). Every child
translates the blocks it runs afresh: blocks translated in the fork server ahead of time, as
unicornafl asks Unicorn to, would lack the stop at the success point and the instruction
count that `emu_start` compiles into the blocks it translates.

Without afl-fuzz (no fd 199: `python afl_harness.py EXPORT FILE`) it runs FILE once and
prints the outcome.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct
import sys
from typing import Any

from resume import Export
from unicorn import UC_HOOK_BLOCK, Uc

FORKSRV_FD = 198  # afl-fuzz -> harness; FORKSRV_FD + 1: harness -> afl-fuzz
MAP_SIZE = 1 << 16


def attach_map() -> memoryview | None:
    """AFL++'s coverage map, when afl-fuzz (or afl-showmap) runs us."""
    shm_id = os.environ.get("__AFL_SHM_ID")
    if shm_id is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    address = libc.shmat(int(shm_id), None, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "shmat of AFL++'s map failed")
    size = int(os.environ.get("AFL_MAP_SIZE", MAP_SIZE))
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


def instrument(uc: Uc, area: memoryview) -> None:
    """AFL's edge coverage of the blocks the engine runs, into `area`."""
    mask = (1 << (len(area).bit_length() - 1)) - 1  # a power of two at most the map's size
    prev = 0

    def on_block(_uc: Any, address: int, _size: int, _user: Any) -> None:
        nonlocal prev
        cur = ((address >> 4) ^ (address << 8)) & mask
        index = cur ^ prev
        area[index] = (area[index] + 1) & 0xFF
        prev = cur >> 1

    uc.hook_add(UC_HOOK_BLOCK, on_block)


def run_child(export: Export, uc: Uc, path: str, area: memoryview | None) -> None:
    """One input in a forked child; never returns (exit 0, or abort on a crash)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if area is not None:
        instrument(uc, area)
    with open(path, "rb") as f:
        data = f.read()
    crash = False
    if export.fits(data):
        export.place(uc, data)
        crash = export.outcome(uc, export.start(uc)).crash
    if crash:
        os.abort()
    os._exit(0)


def serve(export: Export, uc: Uc, path: str, area: memoryview) -> None:
    """AFL++'s fork server: one forked child per input, until afl-fuzz goes away."""
    control, status_fd = FORKSRV_FD, FORKSRV_FD + 1
    os.write(status_fd, b"\0\0\0\0")  # hello: the classic protocol, AFL++'s default map
    while True:
        if len(os.read(control, 4)) != 4:
            return
        pid = os.fork()
        if pid == 0:
            os.close(control)
            os.close(status_fd)
            run_child(export, uc, path, area)
        os.write(status_fd, struct.pack("<i", pid))
        _, status = os.waitpid(pid, 0)
        os.write(status_fd, struct.pack("<i", status))


def main(argv: list[str]) -> int:
    export = Export(argv[1])
    uc = export.machine()
    area = attach_map()
    if area is not None and _open(FORKSRV_FD + 1):
        # afl-fuzz gone: a write to its pipe ends the fork server quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        serve(export, uc, argv[2], area)
        return 0
    # no fork server: run the input once, here (under afl-showmap without one, with the map)
    if area is not None:
        instrument(uc, area)
    with open(argv[2], "rb") as f:
        data = f.read()
    if not export.fits(data):
        print("not run (too large for the channel)")
        return 0
    outcome = export.run(uc, data)
    print(outcome.kind)
    if outcome.crash and area is not None:
        os.abort()
    return 0


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv))
