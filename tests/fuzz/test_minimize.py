"""The crash minimizer on the seed build's known bugs, with gcc-built ELFs padded with junk."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from fuzz.minimize import MinimizeOutcome, NotACrash, main, minimize
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.result import Result
from tests.elfs import build_elf
from tests.reproducers import PHDR, REPRODUCERS

PT_NOTE = 4
# candidates that zero e_phentsize hang the seed loader (RX-06) until the budget runs out: a
# budget of a few million instructions, still far above a normal boot's, keeps each such run
# at tens of milliseconds instead of most of a second
TEST_BUDGET = 2_000_000


def _reproducer(bug: str, elf: bytes) -> bytes:
    return next(r for r in REPRODUCERS if r.bug == bug).make(elf)


def _padded(elf: bytes) -> bytes:
    """`elf` with 8 KiB of junk after it and its program header table moved past the junk,
    with one more entry there: a PT_NOTE that nothing uses."""
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phnum = struct.unpack_from("<H", elf, 0x38)[0]
    note = struct.pack("<IIQQQQQQ", PT_NOTE, 4, 0x100, 0, 0, 0x20, 0x20, 4)
    out = bytearray(elf + random.Random(5).randbytes(8192))
    struct.pack_into("<Q", out, 0x20, len(out))
    struct.pack_into("<H", out, 0x38, phnum + 1)
    out += elf[phoff:phoff + phnum * PHDR] + note
    return bytes(out)


@pytest.fixture(scope="module")
def seed() -> Executor:
    return Executor(load_profile("seed"), budget=TEST_BUDGET)


@pytest.fixture(scope="module")
def base_elf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_elf(tmp_path_factory.mktemp("elf"), loads=3).read_bytes()


@pytest.fixture(scope="module")
def padded_vaddr(seed: Executor, base_elf: bytes) -> tuple[bytes, MinimizeOutcome]:
    data = _padded(_reproducer("RX-03", base_elf))
    return data, minimize(data, seed)


def test_padded_seed_bug_halves_and_keeps_signature(seed: Executor,
                                                    padded_vaddr: tuple[bytes, MinimizeOutcome]
                                                    ) -> None:
    data, outcome = padded_vaddr
    before = seed.run(data)
    assert before.crash_class == "vaddr-corruption"
    assert outcome.signature == before.signature
    assert outcome.crash_class == "vaddr-corruption"
    assert outcome.original_size == len(data)
    assert outcome.size == len(outcome.data) <= len(data) // 2
    assert outcome.result.signature == before.signature
    assert 1 < outcome.executions <= 20_000
    # nothing of the junk, the section headers or the PT_NOTE is needed
    assert outcome.size <= 64 + 4 * PHDR


def test_minimized_input_reproduces_in_fresh_executors(
        padded_vaddr: tuple[bytes, MinimizeOutcome]) -> None:
    _, outcome = padded_vaddr
    profile = load_profile("seed")
    for executor in (Executor(profile), Executor(profile, snapshot=False)):
        result = executor.run(outcome.data)
        assert result.verdict == "crash"
        assert result.signature == outcome.signature


def test_input_that_does_not_crash_is_refused(seed: Executor, base_elf: bytes) -> None:
    with pytest.raises(NotACrash, match="does not crash"):
        minimize(base_elf, seed)
    with pytest.raises(NotACrash, match="rejected"):
        minimize(b"not an elf", seed)


def test_harness_error_on_the_input_itself_propagates(seed: Executor) -> None:
    # larger than the ramdisk: the farm cannot hand it over at all
    too_big = b"\x7fELF" + bytes(load_profile("seed").memory.ramdisk_size)
    with pytest.raises(InputError) as caught:
        minimize(too_big, seed)
    assert not isinstance(caught.value, NotACrash)


class _Flaky:
    """An executor failing on every third candidate, as the harness might on odd inputs."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.calls = 0

    def run(self, data: bytes) -> Result:
        self.calls += 1
        if self.calls > 1 and self.calls % 3 == 0:
            raise HarnessError("simulated harness failure")
        return self.inner.run(data)


def test_harness_error_on_a_candidate_only_rejects_it(seed: Executor, base_elf: bytes) -> None:
    data = _reproducer("RX-07", base_elf)
    flaky = _Flaky(seed)
    outcome = minimize(data, flaky, max_executions=400)  # type: ignore[arg-type]
    assert outcome.harness_errors > 0
    assert outcome.executions == flaky.calls <= 400
    assert outcome.size < len(data)
    assert seed.run(outcome.data).signature == outcome.signature


@pytest.mark.parametrize("bug", ["RX-02", "RX-05", "RX-07", "RX-08"])
def test_other_known_bugs_keep_their_signature(seed: Executor, base_elf: bytes,
                                               bug: str) -> None:
    data = _reproducer(bug, base_elf)
    before = seed.run(data)
    outcome = minimize(data, seed)
    assert outcome.signature == before.signature
    assert seed.run(outcome.data).signature == before.signature
    assert outcome.size <= len(data) // 4


def test_deterministic_and_budgeted(seed: Executor, base_elf: bytes) -> None:
    data = _padded(_reproducer("RX-05", base_elf))
    first = minimize(data, seed)
    again = minimize(data, seed)
    assert (first.data, first.executions) == (again.data, again.executions)
    seen: list[tuple[int, int]] = []
    small = minimize(data, seed, max_executions=60,
                     progress=lambda runs, size: seen.append((runs, size)))
    assert small.executions <= 60
    assert seed.run(small.data).signature == first.signature
    assert seen and seen[-1] == (small.executions, small.size)


def test_main_writes_the_minimized_file(tmp_path: Path, base_elf: bytes,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    crash = tmp_path / "crash.elf"
    crash.write_bytes(_reproducer("RX-07", base_elf))
    assert main([str(crash)]) == 0
    out = capsys.readouterr().out
    written = (tmp_path / "crash.elf.min").read_bytes()
    assert f"{len(base_elf)} -> {len(written)} bytes" in out
    assert "kernel-panic" in out and "executions" in out

    fine = tmp_path / "fine.elf"
    fine.write_bytes(base_elf)
    assert main([str(fine), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not crash" in err
    assert not (tmp_path / "x").exists()

    assert main([str(tmp_path / "missing.elf")]) == 2
    assert capsys.readouterr().err == f"fuzzfarm: error: no such file: {tmp_path}/missing.elf\n"
    assert main(["--kernel", "nonsense", str(crash)]) == 2
    assert "unknown kernel" in capsys.readouterr().err
