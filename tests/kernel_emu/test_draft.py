"""`fuzzfarm kernel init IMAGE` drafts a profile from the image's symbols and says what it
could not find; `fuzzfarm boot --kernel P --check` says whether a profile is good to fuzz with."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kernel_emu.draft import draft_profile
from kernel_emu.profile import PROFILE_DIR, load_profile

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "kernel_emu" / "images"


def _fuzzfarm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(("image", "builtin"), [("seed.efi", "seed"), ("fixed.efi", "fixed"),
                                                ("upstream.efi", "upstream"),
                                                ("seed.elf", "seed-elf")])
def test_the_draft_finds_what_the_hand_written_profile_names(image: str, builtin: str) -> None:
    draft = draft_profile(IMAGES / image)
    profile = load_profile(builtin)
    resize = {"heap.realloc_symbol": profile.heap.realloc_symbol} \
        if profile.heap.realloc_symbol else {}
    assert draft.found == {
        "heap.alloc_symbol": profile.heap.alloc_symbol,
        "heap.dealloc_symbol": profile.heap.dealloc_symbol,
        "heap.free_list_symbol": profile.heap.free_list_symbol,
        "kernel.stack_base_symbol": profile.kernel.stack_base_symbol,
        "kernel.snapshot_symbol": profile.kernel.snapshot_symbol,
        "kernel.success_symbol": profile.kernel.success_symbol,
        **resize,
    }
    # what symbols cannot say is said, not made up
    assert any("heap.base" in m for m in draft.missing)
    raw = tomllib.loads(draft.text)
    assert raw["heap"]["base"] == 0 and raw["heap"]["header_size"] == 0
    assert raw["heap"]["convention"] == profile.heap.convention
    assert raw["heap"].get("realloc_symbol", "") == profile.heap.realloc_symbol
    assert raw["kernel"].get("load_base") == profile.kernel.load_base


def test_init_then_check_from_the_command_line(tmp_path: Path) -> None:
    for name in ("seed.efi", "seed.map"):
        shutil.copy(IMAGES / name, tmp_path / name)
    init = _fuzzfarm("kernel", "init", str(tmp_path / "seed.efi"))
    assert init.returncode == 0, init.stderr
    draft = tmp_path / "seed.toml"
    assert f"wrote {draft}" in init.stdout and "fill in   heap.base" in init.stdout
    again = _fuzzfarm("kernel", "init", str(tmp_path / "seed.efi"))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr

    # as drafted: the symbols are right, the heap is not described yet
    check = _fuzzfarm("boot", "--kernel", str(draft), "--check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "ok    the profile's symbols resolve" in check.stdout
    assert "ok    a valid input reaches the success point" in check.stdout
    assert "FAIL  the heap is described" in check.stdout

    # the heap filled in from the allocator's source (here: the hand-written profile)
    heap = tomllib.loads((PROFILE_DIR / "seed.toml").read_text())["heap"]
    text = draft.read_text()
    for key in ("base", "size", "header_size", "magic"):
        text = "\n".join(f"{key} = {heap[key]:#x}" if line.startswith(f"{key} = ") else line
                         for line in text.splitlines()) + "\n"
    draft.write_text(text)
    check = _fuzzfarm("boot", "--kernel", str(draft), "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "FAIL" not in check.stdout and "the profile is good to fuzz with" in check.stdout

    # a wrong magic is caught
    draft.write_text(text.replace(f"magic = {heap['magic']:#x}", "magic = 0x1234"))
    check = _fuzzfarm("boot", "--kernel", str(draft), "--check")
    assert check.returncode == 1 and "FAIL  the heap's first block header carries" in check.stdout


def test_init_of_something_that_is_no_kernel_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a kernel")
    run = _fuzzfarm("kernel", "init", str(junk))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    missing = _fuzzfarm("kernel", "init", str(tmp_path / "absent.efi"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
