"""Inputs that once produced a false finding, kept as files (see regressions/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.reproducers import get_phdr, loads, set_phdr

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.elf"))


@pytest.fixture(scope="module")
def fixed() -> Executor:
    return Executor(load_profile("fixed"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_files_boot_clean_on_fixed(fixed: Executor, path: Path) -> None:
    result = fixed.run(path.read_bytes())
    assert result.verdict in ("ok", "rejected"), result.findings


def test_segments_sharing_a_page_get_both_rights(fixed: Executor) -> None:
    # text (R+X) and rodata (R) in one page, as linkers without separate-code emit them
    base = (Path(__file__).parents[2] / "fuzzfarm" / "examples" / "three-segments.elf")
    elf = base.read_bytes()
    text, rodata = loads(elf)[0], loads(elf)[1]
    seg = get_phdr(elf, rodata)
    shared = set_phdr(elf, rodata, vaddr=seg["vaddr"] - 0x800, offset=seg["offset"] - 0x800,
                      filesz=seg["filesz"] + 0x800, memsz=seg["memsz"] + 0x800)
    assert get_phdr(shared, text)["vaddr"] + get_phdr(shared, text)["memsz"] <= \
        get_phdr(shared, rodata)["vaddr"]
    for kernel in ("seed", "fixed"):
        result = Executor(load_profile(kernel)).run(shared) if kernel == "seed" \
            else fixed.run(shared)
        assert result.verdict == "ok", (kernel, result.findings)
