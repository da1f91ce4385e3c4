"""Micro-benchmark of the tracing hooks: nanoseconds per guest instruction.

Run from the repository root after building the extension::

    python -m kernel_emu.native.bench_tracer

Two ~100k-instruction guest loops are timed: one that only does arithmetic and branches,
and one that also stores to memory every third instruction (a memory-write hook forces
every store through Unicorn's slow path, so stores are where that hook costs).  A third
loop writes one byte per iteration to the debug console port, like the guest's log, and
reports what serving each ``out`` costs: the tracer's native port hook, a Python OUT hook
next to the native tracer (how ports were served before the tracer did it), and the
fallback's.  Each configuration runs once to translate the code, then is timed over several
runs; the best run is reported because the noise on a shared machine only ever adds time.
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Callable
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
    Uc,
)
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_INS_OUT, UC_X86_REG_RDI

from kernel_emu import tracing

CODE = 0x1000
DATA = 0x10000
RAM = 1 << 20


def alu_loop(iterations: int) -> tuple[bytes, int]:
    # mov ecx, n; l: dec ecx; jnz l; hlt
    code = b"\xb9" + struct.pack("<I", iterations) + b"\xff\xc9\x75\xfc\xf4"
    return code, 2 + 2 * iterations


def store_loop(iterations: int) -> tuple[bytes, int]:
    # mov ecx, n; l: mov [rdi], rcx; dec ecx; jnz l; hlt
    code = b"\xb9" + struct.pack("<I", iterations) + b"\x48\x89\x0f\xff\xc9\x75\xf9\xf4"
    return code, 2 + 3 * iterations


def console_loop(iterations: int) -> tuple[bytes, int]:
    # mov ecx, n; l: mov eax, ecx; out 0xe9, al; dec ecx; jnz l; hlt
    code = b"\xb9" + struct.pack("<I", iterations) + b"\x89\xc8\xe6\xe9\xff\xc9\x75\xf8\xf4"
    return code, 2 + 4 * iterations


def new_engine(code: bytes) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, RAM)
    uc.mem_write(CODE, code)
    return uc


def add_raw_hook(uc: Uc, hook_type: int, callback: int, state: object) -> None:
    handle = ctypes.c_size_t()
    status = uclib.uc_hook_add(
        uc._uch,
        ctypes.byref(handle),
        hook_type,
        ctypes.c_void_p(callback),
        ctypes.c_void_p(state.address),  # type: ignore[attr-defined]
        ctypes.c_uint64(1),
        ctypes.c_uint64(0),
    )
    if status != 0:
        raise RuntimeError(f"uc_hook_add failed: {status}")


def time_runs(uc: Uc, code_len: int, repeats: int, before: Callable[[], None]) -> float:
    """Best wall time of one run, in seconds, after one untimed warm-up run."""
    samples = []
    for attempt in range(repeats + 1):
        before()
        uc.reg_write(UC_X86_REG_RDI, DATA)
        start = time.perf_counter()
        uc.emu_start(CODE, CODE + code_len)
        elapsed = time.perf_counter() - start
        if attempt:
            samples.append(elapsed)
    return min(samples)


def bench(name: str, code: bytes, count: int, repeats: int) -> None:
    results: list[tuple[str, float]] = []

    uc = new_engine(code)
    results.append(("no hooks", time_runs(uc, len(code), repeats, lambda: None)))

    if tracing.native_available():
        from kernel_emu import _tracer

        for label, hooks in (
            ("native code hook only", [(UC_HOOK_CODE, _tracer.CODE_HOOK)]),
            ("native block hook only", [(UC_HOOK_BLOCK, _tracer.BLOCK_HOOK)]),
            ("native write hook only", [(UC_HOOK_MEM_WRITE, _tracer.WRITE_HOOK)]),
        ):
            uc = new_engine(code)
            state = _tracer.State(
                [(0, RAM)],
                True,
                ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value,
                ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value,
            )
            for hook_type, callback in hooks:
                add_raw_hook(uc, hook_type, callback, state)
            uc.ctl_flush_tb()
            seconds = time_runs(uc, len(code), repeats, lambda s=state: s.reset(tracing.NO_BUDGET))
            results.append((label, seconds))

        uc = new_engine(code)
        tracer = tracing.attach_tracer(uc, [(0, RAM)], native=True)
        seconds = time_runs(uc, len(code), repeats, lambda: tracer.reset(tracing.NO_BUDGET))
        assert tracer.instructions == count, (tracer.instructions, count)
        results.append(("native tracer (all hooks)", seconds))
    else:
        print("  (kernel_emu._tracer not built: native rows skipped)")

    uc = new_engine(code)
    tracer = tracing.attach_tracer(uc, [(0, RAM)], native=False)
    seconds = time_runs(uc, len(code), max(2, repeats // 10), lambda: tracer.reset(10**12))
    assert tracer.instructions == count, (tracer.instructions, count)
    results.append(("python fallback (all hooks)", seconds))

    print(f"{name}: {count} instructions per run")
    base = results[0][1]
    for label, seconds in results:
        print(
            f"  {label:30s} {seconds * 1e9 / count:8.2f} ns/insn"
            f"  {seconds * 1e3:8.3f} ms/run  x{seconds / base:6.1f}"
        )


def bench_console(iterations: int, repeats: int) -> None:
    """Nanoseconds each console ``out`` adds on top of the same tracer not serving ports."""
    code, count = console_loop(iterations)
    ports = tracing.PortConfig()

    def timed(native: bool, with_ports: bool, python_out_hook: bool, runs: int) -> float:
        uc = new_engine(code)
        tracer = tracing.attach_tracer(
            uc, [(0, RAM)], native=native, ports=ports if with_ports else None
        )
        if python_out_hook:
            captured = bytearray()

            def on_out(_uc: Uc, port: int, _size: int, value: int, _data: Any) -> None:
                if port == ports.console:
                    captured.append(value & 0xFF)

            uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)
            uc.ctl_flush_tb()
        seconds = time_runs(uc, len(code), runs, lambda: tracer.reset(tracing.NO_BUDGET))
        assert tracer.instructions == count, (tracer.instructions, count)
        expected = iterations if with_ports else 0
        assert len(tracer.console()) == expected, len(tracer.console())
        return seconds

    rows: list[tuple[str, float, float]] = []
    if tracing.native_available():
        base = timed(True, False, False, repeats)
        for label, with_ports, python_hook in (
            ("native tracer + native ports", True, False),
            ("native tracer + Python OUT hook", False, True),
        ):
            rows.append((label, timed(True, with_ports, python_hook, repeats), base))
    else:
        print("  (kernel_emu._tracer not built: native rows skipped)")
    slow = max(2, repeats // 10)
    python_base = timed(False, False, False, slow)
    rows.append(("python fallback + ports", timed(False, True, False, slow), python_base))

    print(f"console loop: {iterations} one-byte outs, {count} instructions per run")
    for label, seconds, baseline in rows:
        print(
            f"  {label:34s} {(seconds - baseline) * 1e9 / iterations:8.1f} ns/out"
            f"  {seconds * 1e9 / iterations:8.1f} ns/iteration  {seconds * 1e3:8.3f} ms/run"
        )


def main() -> None:
    repeats = 20
    for name, (code, count) in (
        ("alu loop", alu_loop(50_000)),
        ("store loop", store_loop(33_333)),
    ):
        bench(name, code, count, repeats)
    bench_console(25_000, repeats)


if __name__ == "__main__":
    main()
