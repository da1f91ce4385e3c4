"""The committed kernel images are what the guest source builds to."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kernel_emu import guest_build
from kernel_emu.image import load_image
from kernel_emu.profile import load_profile

IMAGES = Path(guest_build.__file__).parent / "images"


def _manifest() -> dict:
    return json.loads((IMAGES / "manifest.json").read_text())


@pytest.mark.parametrize("variant", ["seed", "fixed"])
def test_manifest_describes_committed_image(variant: str) -> None:
    entry = _manifest()[variant]
    data = (IMAGES / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert entry["size"] == len(data)
    assert not any(flag.startswith("/") for flag in entry["flags"])


def test_images_match_source(tmp_path: Path) -> None:
    if shutil.which("rustc") is None:
        pytest.skip("rustc is not installed")
    manifest = _manifest()
    if guest_build.rustc_version() != manifest["seed"]["rustc"]:
        pytest.skip(f"rustc differs from the one the images were built with "
                    f"({manifest['seed']['rustc']})")
    rebuilt = guest_build.build_all(tmp_path)
    for variant in ("seed", "fixed"):
        assert rebuilt[variant]["sha256"] == manifest[variant]["sha256"], variant


@pytest.mark.parametrize("variant", ["seed", "fixed"])
def test_profile_symbols_resolve(variant: str) -> None:
    profile = load_profile(variant)
    image = load_image(profile.image)
    for name in (profile.kernel.success_symbol, profile.kernel.snapshot_symbol,
                 profile.kernel.stack_base_symbol, profile.heap.alloc_symbol,
                 profile.heap.dealloc_symbol, profile.heap.free_list_symbol):
        assert image.symbol(name).address
    assert image.describe(image.symbol(profile.heap.alloc_symbol).address + 4).endswith("+0x4")
