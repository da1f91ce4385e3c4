"""`fuzzfarm bench tracer`: what the native tracer's port capture and address watches cost.

Two tight hand-assembled loops run under Unicorn side by side, interleaved, and the medians of
the per-instruction differences are printed with their ratios:

- console: a loop doing one `out 0xe9, al` per iteration, without port capture, with the native
  capture, and with a Python OUT hook — the native capture should cost a small fraction of the
  Python callback it replaces;
- watches: a `dec ecx; jnz` loop with no watch, with the maximum number of watches far from the
  loop, with watches around the loop, and with one more native code hook — an unhit watch should
  cost much less than a hook of its own would.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import UC_X86_INS_OUT, UC_X86_REG_RSP

from kernel_emu import tracing
from kernel_emu.errors import HarnessError
from kernel_emu.tracing import NO_BUDGET, GuestTracer, PortConfig, attach_tracer

CODE = 0x1000
STACK_TOP = 0x9000
RAM_SIZE = 4 << 20
REGIONS = [(0, 0x100000), (0x200000, 0x100000)]


def _d(value: int) -> bytes:
    return struct.pack("<I", value)


def _loop(n: int) -> bytes:
    # mov ecx, n; l: dec ecx; jnz l; hlt
    return b"\xb9" + _d(n) + b"\xff\xc9\x75\xfc\xf4"


def _console_loop(n: int) -> bytes:
    # mov ecx, n; l: mov eax, ecx; out 0xe9, al; dec ecx; jnz l; hlt
    return b"\xb9" + _d(n) + b"\x89\xc8\xe6\xe9\xff\xc9\x75\xf8\xf4"


def _engine(code: bytes) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, RAM_SIZE)
    uc.mem_write(CODE, code)
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    return uc


def _interleaved(configs: dict[str, tuple[Uc, GuestTracer]], repeats: int,
                 check: Callable[[GuestTracer], None]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (uc, tracer) in configs.items():
            tracer.reset(NO_BUDGET)
            start = time.perf_counter()
            uc.emu_start(CODE, 0)
            samples[name].append(time.perf_counter() - start)
            check(tracer)
    return samples


def _extra(samples: dict[str, list[float]], name: str, base: str, per: int) -> float:
    """Median, over repeats, of the extra nanoseconds per iteration of `name` over `base`."""
    return statistics.median(
        (a - b) * 1e9 / per for a, b in zip(samples[name], samples[base], strict=True))


def _console(n: int, repeats: int) -> None:
    from kernel_emu import _tracer  # noqa: F401  (native_available() was checked)

    configs: dict[str, tuple[Uc, GuestTracer]] = {}
    for name, ports, python_hook in (("no capture", None, False), ("native", PortConfig(), False),
                                     ("python hook", None, True)):
        uc = _engine(_console_loop(n))
        tracer = attach_tracer(uc, REGIONS, native=True, ports=ports)
        if python_hook:
            uc.hook_add(UC_HOOK_INSN, lambda *args: None, None, 1, 0, UC_X86_INS_OUT)
        configs[name] = (uc, tracer)
    expected = n

    def check(tracer: GuestTracer) -> None:
        console = tracer.console()
        if console and len(console) != expected:
            raise HarnessError(f"the console captured {len(console)} bytes, expected {expected}")

    samples = _interleaved(configs, repeats, check)
    native = _extra(samples, "native", "no capture", n)
    python = _extra(samples, "python hook", "no capture", n)
    print(f"console capture, {n} OUTs x {repeats} repeats (median extra per OUT):")
    print(f"  native capture {native:7.1f} ns   Python OUT hook {python:7.1f} ns   "
          f"ratio Python/native {python / native if native > 0 else float('inf'):.1f}x")


def _watches(n: int, repeats: int) -> None:
    from kernel_emu import _tracer

    far = [0xFFFF_8000_0000_0000 + 16 * k for k in range(tracing.WATCH_MAX)]
    around = [CODE - 0x10, CODE + 0x1100, CODE + 0x1200, CODE + 0x2000]
    configs: dict[str, tuple[Uc, GuestTracer]] = {}
    for name, watched in (("none", []), ("far", far), ("around", around), ("extra hook", [])):
        uc = _engine(_loop(n))
        tracer = attach_tracer(uc, REGIONS, native=True)
        tracer.watch(watched)
        if name == "extra hook":
            state = tracer._state  # type: ignore[attr-defined]
            tracing._add_native_hook(uc, UC_HOOK_CODE, _tracer.CODE_HOOK, state.address)
            uc.ctl_flush_tb()
        configs[name] = (uc, tracer)

    def check(tracer: GuestTracer) -> None:
        if tracer.take_events():
            raise HarnessError("an unhit watch reported an event")

    samples = _interleaved(configs, repeats, check)
    hook = _extra(samples, "extra hook", "none", n)
    print(f"address watches, {n} loop iterations x {repeats} repeats "
          f"(median extra per iteration):")
    for name, label in (("far", f"{tracing.WATCH_MAX} far watches"),
                        ("around", "4 watches around the loop")):
        extra = _extra(samples, name, "none", n)
        share = f"{extra / hook:.2f}" if hook > 0 else "n/a"
        print(f"  {label:<27} {extra:6.2f} ns   ({share} of one more code hook, "
              f"{hook:.2f} ns)")


def bench_tracer(repeats: int) -> int:
    if not tracing.native_available():
        raise HarnessError("kernel_emu._tracer is not built; reinstall the package")
    _console(20_000, repeats)
    _watches(50_000, repeats)
    return 0
