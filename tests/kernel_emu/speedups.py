"""What the tests of the emulator's speed-ups share: an executor with the speed-up and one
without it, set up as the fuzzer runs them, and everything a run's outcome is compared by."""

from __future__ import annotations

from typing import Any

from fuzz.harness import WATCHDOG
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

KERNELS = ("seed", "fixed")


def executor_pairs(**without: Any) -> dict[str, tuple[Executor, Executor]]:
    """Per kernel: (speed-up on, off), both with the fuzzer's watchdog and coverage; `without`
    names the switch that turns it off."""
    return {k: (Executor(load_profile(k), coverage=True, watchdog=WATCHDOG),
                Executor(load_profile(k), coverage=True, watchdog=WATCHDOG, **without))
            for k in KERNELS}


def observe(ex: Executor, data: bytes) -> tuple[object, ...]:
    result = ex.run(data)
    return (result.comparable(), result.instructions, ex.stalled_at, ex.tracer.recent_blocks(),
            bytes(ex.tracer.coverage()), ex.console(), ex.tracer.instructions)


def count_calls(monkeypatch: Any, owner: object, name: str) -> list[int]:
    """Replace `owner.name` (a reference judge behind a native fast path) by itself, counted:
    the count is the returned list's only item, so a test can hold that the fast path really
    spares the calls."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, counted)
    return calls
