"""Everything the farm knows about one kernel comes from its target profile (and its image):
no Rustux constant is written into the farm's code. The constants are searched for in every
source file outside the profiles, the guest kernel and the tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("*.py", "*.c", "*.h", "*.html", "*.js", "*.toml", "*.yml", "*.cfg", "*.sh")
ALLOWED = ("tests/", "kernel_emu/profiles/", "kernel_emu/guest/", ".venv/", "out/", "build/")
# the seed heap's first payload (the address the development plan reports), the magics of
# the seed and upstream heaps' block headers; names a module would give a copied heap fact
FORBIDDEN = re.compile(
    r"0x30_?0028|0x4b4c_?4250_?4145_?4852|0x4b4c42504145_4852|0xdead_?beef_?cafe_?babe"
    r"|\b(?:HEAP_BASE|HEAP_SIZE|HEAP_HEADER|SEGMENT_RECORD|KERNEL_IMAGE)\s*=\s*0x",
    re.IGNORECASE)
# a file name (the example input named after what it shows) is not a constant
FILE_NAMES = re.compile(r"vaddr-0x300028\.elf")


def _sources() -> list[Path]:
    out = []
    for pattern in SOURCES:
        for path in ROOT.rglob(pattern):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(ALLOWED) and "/." not in f"/{rel}":
                out.append(path)
    return out


def test_no_kernel_constant_outside_the_profiles() -> None:
    found = []
    for path in _sources():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(FILE_NAMES.sub("", line)):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_search_would_see_one() -> None:
    """The pattern catches the forms a copied constant takes."""
    for text in ("HEAP_BASE = 0x30_0000", "x = 0x300028", "MAGIC = 0xDEADBEEFCAFEBABE",
                 "magic == 0x4b4c42504145_4852", "0xDEAD_BEEF_CAFE_BABE"):
        assert FORBIDDEN.search(text), text
    assert not FORBIDDEN.search(FILE_NAMES.sub("", "examples/vaddr-0x300028.elf"))
    assert len(_sources()) > 50
