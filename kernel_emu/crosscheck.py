"""Crosscheck: the same UEFI kernel image and input, booted by the emulator and by real
firmware (QEMU + OVMF), and the kernel's debug-console logs compared line by line.

Real firmware boots first, on a machine with the profile's RAM size; the boot shim says where
the firmware loaded the kernel, and the emulator then loads it at that same address. What a
kernel does can depend on where it was loaded (an input's segment may overlap the kernel
there and not elsewhere), so this is the only fair comparison.

What legitimately differs between the two machines is normalised before the comparison: where
the firmware put things (image handle, system table, the ramdisk, the kernel stack, page
tables) and what the memory map holds (its entries, and the page allocator's counts derived
from it). Everything else, in particular the loaded-segment table and the user entry point,
must be the same. The emulated run ends at the success point or at the fault it reports;
the kernel on real firmware carries on, so lines past the end of the emulated log are shown,
not compared.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel_emu import qemu
from kernel_emu.executor import Executor
from kernel_emu.inputs import embed_in_image
from kernel_emu.profile import TargetProfile
from kernel_emu.ramdisk import build_init_ramdisk
from kernel_emu.result import Result

ANY = "…"
# lines dropped before comparing: the boot shim's own, and the memory map's entries
_DROPPED = re.compile(r"^(\[rxboot\] |\[boot\] mem )")
# (line pattern, the groups that differ by machine)
_VARYING = [
    re.compile(r"^\[boot\] Rustux efi_main image_handle=(\S+) system_table=(\S+)$"),
    re.compile(r"^\[boot\] boot services exited, memory map has (\d+) entries$"),
    re.compile(r"^\[mm\] page allocator: (\d+) pages in (\d+) ranges$"),
    re.compile(r"^\[mm\] kstack base=(\S+) top=(\S+)$"),
    re.compile(r"^\[mm\] \d+ zeroed pages at (\S+)$"),
    re.compile(r"^\[elf\] bin/init at (\S+), \d+ bytes$"),
    re.compile(r"^\[user\] enter rip=\S+ rsp=\S+ cr3=(\S+)$"),
]
# after one of these the kernel has nothing more to say (it halts or enters ring 3)
_LAST = ("[user] enter ", "[PANIC] ", "rejected: ")
SETTLE = 1.0  # seconds QEMU runs on after a last line, for what the kernel says next
_LOADED_AT = re.compile(r"^\[rxboot\] kernel image at (0x[0-9a-fA-F]+),", re.M)


def normalise(log: str) -> list[str]:
    """The log's lines with what differs by machine replaced by `…`."""
    out = []
    for line in log.splitlines():
        line = line.rstrip()
        if not line or _DROPPED.match(line):
            continue
        for pattern in _VARYING:
            m = pattern.match(line)
            if m:
                for i in range(len(m.groups()), 0, -1):
                    line = line[:m.start(i)] + ANY + line[m.end(i):]
                break
        out.append(line)
    return out


@dataclass
class Crosscheck:
    emulated: list[str]
    real: list[str]  # normalised, as far as the emulated log goes
    after: list[str]  # what the kernel said on real firmware after the emulated run ended
    result: Result
    seconds_emulated: float
    seconds_real: float
    real_ended: str  # how the QEMU run ended: done, exited, timeout
    load_base: int  # where the firmware loaded the kernel, and the emulator too
    differences: list[tuple[int, str, str]] = field(default_factory=list)  # (line, emu, real)

    @property
    def same(self) -> bool:
        return not self.differences


def _finished(log: str, seen: dict[str, float]) -> bool:
    """True once the kernel said its last line and SETTLE seconds have passed."""
    if "[rxboot] " in log and " failed: " in log:
        return True
    if not any(line.startswith(_LAST) for line in log.splitlines()):
        return False
    first = seen.setdefault("last", time.monotonic())
    return time.monotonic() - first >= SETTLE


def is_uefi(profile: TargetProfile) -> bool:
    """The profile's image is a UEFI application (what real firmware can boot)."""
    try:
        with open(profile.image, "rb") as f:
            return f.read(2) == b"MZ"
    except OSError:
        return False


def real_load_base(log: str) -> int | None:
    """Where real firmware loaded the kernel, as the boot shim reports it."""
    m = _LOADED_AT.search(log)
    return int(m.group(1), 16) if m else None


def at_load_base(profile: TargetProfile, base: int) -> TargetProfile:
    """The same build, loaded at `base`."""
    return dataclasses.replace(profile, kernel=dataclasses.replace(profile.kernel,
                                                                   load_base=base))


def crosscheck(profile: TargetProfile, data: bytes, timeout: float = 120.0,
               executor: Executor | None = None) -> Crosscheck:
    """Boot `data` on the profile's UEFI image under QEMU + OVMF (with the profile's RAM
    size), then in the emulator at the address where the real firmware loaded the kernel (a
    full boot; by `executor` if it loads the image there)."""
    if not is_uefi(profile):
        raise qemu.FirmwareBootError(f"{profile.name}: not a UEFI application (a crosscheck "
                                     f"boots the image real firmware boots)")
    if executor is not None and (executor.profile != profile or executor.use_snapshot):
        raise ValueError("crosscheck: the executor must make full boots of this profile")
    seen: dict[str, float] = {}
    if profile.input.channel == "embedded":
        # the input built into the image, as the kernel expects it; the shim's ramdisk is empty
        kernel, ramdisk = embed_in_image(profile, data), build_init_ramdisk(b"")
    else:
        kernel, ramdisk = Path(profile.image).read_bytes(), build_init_ramdisk(data)
    real = qemu.boot_kernel(kernel, ramdisk, timeout, lambda log: _finished(log, seen),
                            memory_mib=max(1, profile.memory.ram_size >> 20))
    base = real_load_base(real.log)
    if base is None:
        tail = " | ".join(real.log.strip().splitlines()[-3:]) or "nothing"
        raise qemu.FirmwareBootError(f"the boot shim did not say where the firmware loaded "
                                     f"the kernel (QEMU {real.ended}; it said: {tail:.300})")
    if executor is None or executor.image.load_base != base:
        executor = Executor(at_load_base(profile, base), snapshot=False)
    started = time.monotonic()
    result = executor.run(data)
    seconds_emulated = time.monotonic() - started
    emulated, real_lines = normalise(result.log), normalise(real.log)
    check = Crosscheck(emulated, real_lines[:len(emulated)], real_lines[len(emulated):],
                       result, seconds_emulated, real.seconds, real.ended, base)
    for i in range(max(len(emulated), len(check.real))):
        a = emulated[i] if i < len(emulated) else ""
        b = check.real[i] if i < len(check.real) else ""
        if a != b:
            check.differences.append((i + 1, a, b))
    return check
