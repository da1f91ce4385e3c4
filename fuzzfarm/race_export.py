"""The farm's snapshot exported in a neutral form, for fuzzers that bring their own Unicorn
(`fuzzfarm bench compare`, the race; read back by `fuzzfarm/race/resume.py`).

Everything comes from the profile, the image and the machine the Executor stopped at its
snapshot point; nothing about the kernel is written here:

* memory: every RAM bank's non-zero pages (`bank-<i>.bin`, their indexes in `machine.json`);
* the CPU as Unicorn needs it to resume in long mode: general registers, RIP, RFLAGS, control
  registers, EFER and the other MSRs, GDTR and IDTR, segment selectors, XMM and MXCSR;
* the input: found by placing inputs of three lengths through the farm's own channel
  (`kernel_emu/inputs.py`) and reading back the guest ranges the channel says it writes: the
  bytes before the input, the fields that follow its length, where its bytes go; checked
  byte for byte on a fourth length;
* stops: the profile's success point, the panic handler (`rust_begin_unwind`, the symbol every
  Rust `#[panic_handler]` is exported as), every handler the guest's IDT names; the budget of
  instructions after the snapshot (the profile's, less what the boot to the snapshot took).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from unicorn import x86_const as X

from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.inputs import encode

FORMAT = 1
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
# EFER, FS/GS base, kernel GS base, STAR/LSTAR/CSTAR/SFMASK, PAT, SYSENTER
MSRS = (0xC000_0080, 0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0081, 0xC000_0082,
        0xC000_0083, 0xC000_0084, 0x277, 0x174, 0x175, 0x176)
PANIC_SYMBOL = "rust_begin_unwind"
# lengths of the probe inputs the channel's encoding is read from
PROBES = (37, 300, 4099, 70001)
MAX_TEMPLATE = 1 << 16


def _reg(name: str) -> int:
    return int(getattr(X, f"UC_X86_REG_{name.upper()}"))


def _probe(length: int) -> bytes:
    seed = length.to_bytes(4, "little")
    out = bytearray()
    while len(out) < length:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:length])


def _placed(executor: Executor, data: bytes) -> list[bytes]:
    """The channel's ranges as they read after `data` is placed on a restored snapshot."""
    executor.restore(None)
    executor.channel.place(encode(executor.profile, data))
    m = executor.machine
    return [m.read(lo, hi - lo) for lo, hi in executor.channel.ranges]


def _fields(a: bytes, b: bytes, la: int, lb: int) -> list[list[int]]:
    """Little-endian fields at which `a` and `b` differ by the input lengths' difference."""
    fields, i = [], 0
    while i < min(len(a), len(b)):
        if a[i] == b[i]:
            i += 1
            continue
        for size in (8, 4, 2):
            va = int.from_bytes(a[i:i + size], "little")
            vb = int.from_bytes(b[i:i + size], "little")
            if len(a[i:i + size]) == size and va - la == vb - lb:
                fields.append([i, size, va - la])
                i += size
                break
        else:
            raise HarnessError(f"cannot describe the input channel: byte {i} of a range it "
                               "writes changes with the input, but not as its length")
    return fields


def input_layout(executor: Executor) -> dict[str, Any]:
    ranges = executor.channel.ranges
    placed = {n: _placed(executor, _probe(n)) for n in PROBES}
    out = []
    small, large = PROBES[0], PROBES[1]
    for r, (lo, hi) in enumerate(ranges):
        where = [placed[n][r].find(_probe(n)) for n in PROBES]
        if all(w >= 0 for w in where) and len(set(where)) == 1:
            offset = where[0]
            head_a, head_b = placed[small][r][:offset], placed[large][r][:offset]
            fields = _fields(head_a, head_b, small, large)
            template = bytearray(head_a)
            for at, size, _ in fields:
                template[at:at + size] = bytes(size)
            out.append({"address": lo, "template": bytes(template).hex(), "fields": fields,
                        "data_offset": offset, "capacity": hi - lo - offset})
        else:
            a, b = placed[small][r], placed[large][r]
            # a range without the input's bytes (a descriptor, say) is written whole
            if len(a) > MAX_TEMPLATE:
                raise HarnessError(f"cannot describe the input channel: a range of {len(a)} "
                                   "bytes is written for every input")
            fields = _fields(a, b, small, large)
            template = bytearray(a)
            for at, size, _ in fields:
                template[at:at + size] = bytes(size)
            out.append({"address": lo, "template": bytes(template).hex(), "fields": fields,
                        "data_offset": None, "capacity": None})
    capacities = [r["capacity"] for r in out if r["capacity"] is not None]
    if len(capacities) != 1:
        raise HarnessError("cannot describe the input channel: the input's bytes are not in "
                           "exactly one of the ranges it writes")
    layout = {"ranges": out, "max_size": capacities[0]}
    _check_layout(executor, layout, placed)
    return layout


def encode_with(layout: dict[str, Any], data: bytes) -> list[tuple[int, bytes]]:
    """What a competitor writes for `data` (the same rules as resume.py's InputRange)."""
    writes = []
    for r in layout["ranges"]:
        out = bytearray(bytes.fromhex(r["template"]))
        for at, size, addend in r["fields"]:
            value = (len(data) + addend) & ((1 << (8 * size)) - 1)
            out[at:at + size] = value.to_bytes(size, "little")
        if r["data_offset"] is not None:
            out[r["data_offset"]:] = data
        writes.append((r["address"], bytes(out)))
    return writes


def _check_layout(executor: Executor, layout: dict[str, Any],
                  placed: dict[int, list[bytes]]) -> None:
    for n in PROBES:
        for (address, written), (lo, _hi), got in zip(encode_with(layout, _probe(n)),
                                                      executor.channel.ranges, placed[n],
                                                      strict=True):
            at = address - lo
            if got[at:at + len(written)] != written:
                raise HarnessError("cannot describe the input channel: an input of "
                                   f"{n} bytes is not placed as the exported rules say")


def _cpu_model(model: int) -> str:
    names = [n[len("UC_CPU_X86_"):] for n in dir(X)
             if n.startswith("UC_CPU_X86_") and n != "UC_CPU_X86_ENDING"
             and getattr(X, n) == model]
    if not names:
        raise HarnessError(f"Unicorn's x86 CPU model {model} has no name")
    return names[0]


def idt_handlers(executor: Executor) -> list[int]:
    """The handler of every present gate of the IDT the snapshot's IDTR points at."""
    m = executor.machine
    _sel, base, limit, _flags = m.uc.reg_read(X.UC_X86_REG_IDTR)
    handlers = set()
    for at in range(base, base + limit + 1 - 15, 16):
        low, high = struct.unpack("<QQ", m.read(at, 16))
        if not low >> 47 & 1:  # not present
            continue
        handlers.add((low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFF_FFFF) << 32)
    return sorted(handlers)


def export_snapshot(executor: Executor, out: Path) -> dict[str, Any]:
    """Write the snapshot of `executor` (a snapshot Executor) to `out`; returns machine.json."""
    if executor.snapshot is None:
        raise HarnessError(f"{executor.profile.name}: no snapshot to export "
                           f"({'; '.join(executor.notes) or 'snapshots off'})")
    out.mkdir(parents=True, exist_ok=True)
    layout = input_layout(executor)
    executor.restore(None)  # the machine as the snapshot left it
    m, snap = executor.machine, executor.snapshot
    uc = m.uc
    banks = []
    for i, (bank, pages) in enumerate(zip(m.banks, snap.pages, strict=True)):
        present = [n for n, page in enumerate(pages) if page is not None]
        name = f"bank-{i}.bin"
        with (out / name).open("wb") as f:
            for n in present:
                f.write(pages[n] or b"")
        banks.append({"base": bank.base, "size": bank.size, "file": name, "pages": present})
    regs = m.registers()
    image = executor.image
    panic = sorted({s.address for s in image.symbols if s.name.endswith(PANIC_SYMBOL)})
    spec = {
        "format": FORMAT,
        "kernel": executor.profile.name,
        "image_sha256": image.sha256,
        "cpu_model": _cpu_model(uc.ctl_get_cpu_model()),
        "registers": {name: regs[name] for name in (*GPRS, "rip", "rflags", "cr0", "cr2",
                                                    "cr3", "cr4")},
        "selectors": {name: int(uc.reg_read(_reg(name))) for name in SELECTORS},
        "tables": {name: list(uc.reg_read(_reg(name))[1:3]) for name in ("gdtr", "idtr")},
        "msrs": {str(msr): int(uc.msr_read(msr)) for msr in MSRS},
        "vector": {**{f"xmm{i}": int(uc.reg_read(_reg(f"xmm{i}"))) for i in range(16)},
                   "mxcsr": int(uc.reg_read(_reg("mxcsr")))},
        "banks": banks,
        "input": layout,
        "stops": {"success": executor.success_addr, "panic": panic,
                  "fault_handlers": idt_handlers(executor)},
        "budget": executor.budget - snap.instructions,
    }
    (out / "machine.json").write_text(json.dumps(spec, indent=1) + "\n")
    return spec
