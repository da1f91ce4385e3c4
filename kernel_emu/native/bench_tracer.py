"""Micro-benchmark of the tracing hooks: nanoseconds per guest instruction.

Run from the repository root after building the extension::

    python -m kernel_emu.native.bench_tracer      (or: fuzzfarm bench tracer)

Two ~100k-instruction guest loops are timed: one that only does arithmetic and branches,
and one that also stores to memory every third instruction (a memory-write hook forces
every store through Unicorn's slow path, so stores are where that hook costs).  A third
loop writes one byte per iteration to the debug console port, like the guest's log, and
reports what serving each ``out`` costs: the tracer's native port hook, a Python OUT hook
next to the native tracer (how ports were served before the tracer did it), and the
fallback's.

Watches: the alu loop is timed under the native tracer with no watches, with watches far from
the loop (rejected by the range test), with watches around the loop whose low address bits
differ from the loop's (rejected by the filter) and, as the worst case, with watches whose
low bits equal the loop's (an exact comparison per instruction); next to it, the tracer plus
the three single-address Python code hooks the allocator was observed with before (never hit:
what merely registering them costs).  Then a loop calling a small function whose entry and
``ret`` are watched reports what recording one event costs, natively and with Python code
hooks at the same two addresses.

Each configuration runs once to translate the code, then is timed over several runs; the best
run is reported because the noise on a shared machine only ever adds time.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
)
from unicorn.unicorn_py3.unicorn import Uc, uclib
from unicorn.x86_const import UC_X86_INS_OUT, UC_X86_REG_RDI, UC_X86_REG_RSP

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


def call_loop(iterations: int) -> tuple[bytes, int, list[int]]:
    """A loop calling f; returns the code, its instruction count and f's entry and ret."""
    # mov ecx, n; l: call f; dec ecx; jnz l; hlt
    # f: push rbp; mov rbp, rsp; mov rax, rdi; pop rbp; ret
    head = b"\xb9" + struct.pack("<I", iterations)
    body = b"\xe8" + struct.pack("<i", 5) + b"\xff\xc9\x75\xf7"
    tail = b"\xf4" + b"\x55\x48\x89\xe5\x48\x89\xf8\x5d\xc3"
    f = CODE + len(head) + len(body) + 1
    return head + body + tail, 2 + 8 * iterations, [f, f + 8]


def console_loop(iterations: int) -> tuple[bytes, int]:
    # mov ecx, n; l: mov eax, ecx; out 0xe9, al; dec ecx; jnz l; hlt
    code = b"\xb9" + struct.pack("<I", iterations) + b"\x89\xc8\xe6\xe9\xff\xc9\x75\xf8\xf4"
    return code, 2 + 4 * iterations


def new_engine(code: bytes) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, RAM)
    uc.mem_write(CODE, code)
    return uc


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
                tracing.function_address(uclib.uc_emu_stop),
                tracing.function_address(uclib.uc_reg_read),
            )
            for hook_type, callback in hooks:
                tracing.add_native_hook(uc, hook_type, callback, state.address)
            uc.ctl_flush_tb()
            seconds = time_runs(uc, len(code), repeats, partial(state.reset, tracing.NO_BUDGET))
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


def timed_tracer(
    code: bytes,
    count: int,
    repeats: int,
    watched: list[int],
    python_hooks: list[int],
    native: bool = True,
) -> tuple[float, int]:
    """Best run time and events per run of a tracer watching ``watched``."""
    uc = new_engine(code)
    tracer = tracing.attach_tracer(uc, [(0, RAM)], native=native)
    tracer.watch(watched)
    hits: list[int] = []
    for address in python_hooks:
        uc.hook_add(UC_HOOK_CODE, lambda _uc, a, _s, _d: hits.append(a), None, address, address)
    uc.ctl_flush_tb()
    events = 0

    def before() -> None:
        nonlocal events
        events = len(tracer.take_events()) + len(hits)
        hits.clear()
        tracer.reset(tracing.NO_BUDGET)
        uc.reg_write(UC_X86_REG_RSP, DATA)

    seconds = time_runs(uc, len(code), repeats, before)
    before()
    assert tracer.instructions == 0 and tracer.events_dropped == 0
    return seconds, events


def bench_watches(repeats: int) -> None:
    if not tracing.native_available():
        print("watches: kernel_emu._tracer not built, skipped")
        return
    code, count = alu_loop(50_000)
    loop = [CODE + 5, CODE + 7]  # dec, jnz: the instructions the loop spends its time on
    far = [0xFFFF_8000_0000_0000 + 16 * k for k in range(tracing.WATCH_MAX)]
    # Around the loop, one page up: the low 12 bits of the first two equal the loop's.
    colliding = [CODE - 0x10, *(a + 0x1000 for a in loop), CODE + 0x2000]
    clear = [CODE - 0x10, CODE + 0x1100, CODE + 0x1200, CODE + 0x2000]
    base, _ = timed_tracer(code, count, repeats, [], [])
    print(f"alu loop under the native tracer: {count} instructions per run, none watched")
    for label, watched, python_hooks in (
        ("no watches", [], []),
        ("32 watches far from the loop", far, []),
        ("4 watches around, filtered", clear, []),
        ("4 watches around, colliding", colliding, []),
        ("3 Python code hooks, not hit", [], [CODE - 0x10, CODE + 0x1100, CODE + 0x2000]),
    ):
        seconds, events = timed_tracer(code, count, repeats, watched, python_hooks)
        assert events == 0
        print(
            f"  {label:34s} {seconds * 1e9 / count:8.2f} ns/insn"
            f"  {(seconds - base) * 1e9 / count:+8.2f} ns/insn vs none"
        )

    iterations = 2000
    code, count, f = call_loop(iterations)
    print(f"call loop: {iterations} calls of f, entry and ret watched, {count} instructions")
    slow = max(2, repeats // 10)
    for label, native, watched, python_hooks, runs in (
        ("native tracer + native watches", True, f, [], repeats),
        ("native tracer + Python code hooks", True, [], f, slow),
        ("python fallback + watches", False, f, [], slow),
    ):
        base, _ = timed_tracer(code, count, runs, [], [], native)
        seconds, events = timed_tracer(code, count, runs, watched, python_hooks, native)
        assert events == 2 * iterations, events
        print(
            f"  {label:34s} {(seconds - base) * 1e9 / events:8.1f} ns/event"
            f"  {seconds * 1e3:8.3f} ms/run"
        )


def main(repeats: int = 20) -> None:
    for name, (code, count) in (
        ("alu loop", alu_loop(50_000)),
        ("store loop", store_loop(33_333)),
    ):
        bench(name, code, count, repeats)
    bench_console(25_000, repeats)
    bench_watches(repeats)


if __name__ == "__main__":
    main()
