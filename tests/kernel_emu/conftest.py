"""Fixtures shared by the emulator's tests."""

from __future__ import annotations

import pytest

from tests.elfs import build_elf


@pytest.fixture(scope="module")
def base_elf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A gcc-built ELF with three PT_LOADs, the base the bug reproducers are made from."""
    return build_elf(tmp_path_factory.mktemp("elf"), loads=3).read_bytes()
