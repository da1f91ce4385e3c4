"""Guest feedback for libFuzzer: the native hooks and their pure-Python twin agree."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

import pytest

from fuzz.feedback import MAP_SIZE, NativeFeedback, PythonFeedback
from fuzz.harness import Job, JobConfig
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.reproducers import REPRODUCERS

EXAMPLE = Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf"


@pytest.fixture(scope="module")
def inputs() -> list[bytes]:
    base = EXAMPLE.read_bytes()
    return [base, b"", b"\x7fELF" + bytes(60)] + [r.make(base) for r in REPRODUCERS
                                                  if r.bug not in ("RX-01", "RX-06")]


def _observe(feedback_cls: type, inputs: list[bytes]) -> list[tuple[int, int, bytes]]:
    ex = Executor(load_profile("seed"), coverage=True)
    fb = feedback_cls()
    ex.add_machine_hook(fb.attach)
    out = []
    for data in inputs:
        before = fb.compares
        ex.run(data)
        coverage = bytes(ex.tracer.coverage())
        fresh = fb.collect(ex.tracer.coverage())
        out.append((fresh, fb.compares - before, coverage))
    return out


def test_native_and_python_feedback_agree(inputs: list[bytes]) -> None:
    native = _observe(NativeFeedback, inputs)
    python = _observe(PythonFeedback, inputs)
    assert native == python
    assert all(n[1] > 0 for n in native)  # every boot compares something
    assert native[0][0] > 0  # the first run brings new edges
    assert sum(1 for n in native[1:] if n[0] > 0) >= 2  # different inputs, different paths


def test_collect_counts_only_new_edges() -> None:
    for fb in (NativeFeedback(), PythonFeedback()):
        run = bytearray(MAP_SIZE)
        run[7] = 3
        run[9000] = 1
        assert fb.collect(memoryview(bytes(run))) == 2
        assert fb.collect(memoryview(bytes(run))) == 0
        run[12] = 255
        assert fb.collect(memoryview(bytes(run))) == 1
        assert fb.edges == 3
        with pytest.raises(ValueError):
            fb.collect(memoryview(b"short"))


def test_the_counters_hold_exactly_the_last_map() -> None:
    """What libFuzzer reads after a run is that run's map, whatever the runs before left."""
    fb = NativeFeedback()
    rng = random.Random(5)
    for _ in range(30):
        run = bytearray(MAP_SIZE)
        for _ in range(rng.choice((0, 1, 50, 800))):
            run[rng.randrange(MAP_SIZE)] = rng.randrange(1, 256)
        fb.collect(memoryview(bytes(run)))
        assert ctypes.string_at(fb._state.counters_address, MAP_SIZE) == bytes(run)


def test_harness_error_is_recorded_apart_and_never_a_finding(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    job = Job(JobConfig(kernel="seed", out=str(tmp_path)))
    broken = job.executor

    def explode(data: bytes) -> None:
        raise RuntimeError("a bug in the harness")

    monkeypatch.setattr(broken, "run", explode)
    job.run_input(b"\x7fELF input")
    assert job.stats.harness_errors == 1
    assert job.stats.findings == {}
    assert job.solutions.buckets() == []
    errors = list((tmp_path / "harness-errors").glob("*.json"))
    assert len(errors) == 1
    assert "a bug in the harness" in errors[0].read_text()
    # the executor was rebuilt and the job goes on booting real inputs
    assert job.executor is not broken
    job.run_input(EXAMPLE.read_bytes())
    assert job.stats.harness_errors == 1


def test_native_and_python_count_the_same_new_edges_in_any_map() -> None:
    """Random maps, any byte values (a lone high bit, say), hits side by side in one word or
    alone in a 64-byte line: the native collect counts new edges exactly as the Python one."""
    native, python = NativeFeedback(), PythonFeedback()
    rng = random.Random(9)
    for _ in range(60):
        run = bytearray(MAP_SIZE)
        for _ in range(rng.choice((0, 1, 7, 300, 3000))):
            at = rng.randrange(MAP_SIZE)
            for k in range(rng.choice((1, 1, 2, 8))):
                if at + k < MAP_SIZE:
                    run[at + k] = rng.choice((1, 0x80, 0x10, rng.randrange(1, 256)))
        got = native.collect(memoryview(bytes(run)))
        assert got == python.collect(memoryview(bytes(run)))
        assert native.edges == python.edges
    assert native.edges > 1000


def _lines_of(coverage: bytes) -> set[int]:
    return {i // 64 for i, byte in enumerate(coverage) if byte}


def _named(lines: bytes) -> set[int]:
    return {i for i in range(len(lines) * 8) if lines[i // 8] >> (i % 8) & 1}


def test_the_tracer_names_every_line_a_run_hit(inputs: list[bytes]) -> None:
    """Block entries, bulk moves and skipped cycles all bump counters: each counter a run
    bumped lies in a line the tracer names, reset clears them all, and a collect told the
    lines counts and copies what a collect of the whole map does."""
    from fuzz.harness import WATCHDOG
    from fuzz.mutator import ElfMutator
    from tests.kernel_emu.test_cycles import _hang

    ex = Executor(load_profile("seed"), coverage=True, watchdog=WATCHDOG)
    whole, told = NativeFeedback(), NativeFeedback()
    rng, mutator = random.Random(4), ElfMutator(None, seed=4)
    runs = inputs + [_hang(inputs[0])] + [
        mutator.mutate(rng.choice(inputs[:1] + [_hang(inputs[0])]), 16384,
                       rng.randrange(1 << 32)) for _ in range(60)]
    skipped = bulk = 0
    for data in runs:
        ex.run(data)
        coverage, lines = bytes(ex.tracer.coverage()), ex.tracer.coverage_lines()
        assert lines is not None and len(lines) == MAP_SIZE // 64 // 8
        assert _lines_of(coverage) <= _named(lines)
        skipped += ex.skipped_instructions > 0
        bulk += ex.tracer.fast_units > 0
        assert told.collect(memoryview(coverage), lines) == whole.collect(memoryview(coverage))
        assert ctypes.string_at(told._state.counters_address, MAP_SIZE) == \
            ctypes.string_at(whole._state.counters_address, MAP_SIZE)
    assert told.edges == whole.edges > 100
    assert skipped and bulk  # both other ways of bumping counters were taken
    ex.tracer.reset(1000)
    assert not any(ex.tracer.coverage()) and not any(ex.tracer.coverage_lines() or b"")


def test_collect_with_lines_ignores_the_lines_not_named() -> None:
    """The lines bitmap is trusted: a hit outside it is not read (which is why the tracer
    must name every line it touched), and a bitmap of the wrong size is refused."""
    fb = NativeFeedback()
    run = bytearray(MAP_SIZE)
    run[5], run[64 * 3 + 1] = 1, 2
    lines = bytearray(MAP_SIZE // 64 // 8)
    lines[0] = 1 << 3
    assert fb.collect(memoryview(bytes(run)), bytes(lines)) == 1
    assert fb.collect(memoryview(bytes(run))) == 1  # the other one, read this time
    with pytest.raises(ValueError):
        fb.collect(memoryview(bytes(run)), b"\xff")
