"""The committed kernel images are what the guest source builds to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kernel_emu import guest_build
from kernel_emu.image import load_image
from kernel_emu.profile import load_profile

IMAGES = Path(guest_build.__file__).parent / "images"


def _manifest() -> dict:
    return json.loads((IMAGES / "manifest.json").read_text())


@pytest.mark.parametrize("variant", ["seed-elf", "fixed-elf", "upstream-elf"])
def test_manifest_describes_committed_image(variant: str) -> None:
    entry = _manifest()[variant]
    data = (IMAGES / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert entry["size"] == len(data)
    assert not any(flag.startswith("/") for flag in entry["flags"])


def _version(rustc: str) -> str:
    try:
        return guest_build.rustc_version(rustc)
    except guest_build.GuestBuildError as e:
        return f"unusable: {e}"


def test_images_match_source(tmp_path: Path) -> None:
    """Skipped only when no rustc of the pinned version is found ($RUSTC, PATH, ~/.cargo/bin):
    with one, an image that does not come out byte for byte fails."""
    manifest = _manifest()
    pinned = manifest["seed-elf"]["rustc"]
    assert manifest["fixed-elf"]["rustc"] == manifest["upstream-elf"]["rustc"] == pinned
    rustc = guest_build.find_rustc(pinned)
    if rustc is None:
        found = "; ".join(f"{c}: {_version(c)}" for c in guest_build.rustc_candidates())
        pytest.skip(f"no rustc of the version the images were built with ({pinned}); "
                    f"found: {found or 'none'}")
    rebuilt = guest_build.build_all(tmp_path, rustc=rustc)
    for variant in ("seed-elf", "fixed-elf", "upstream-elf"):
        assert rebuilt[variant]["rustc"] == pinned, variant
        assert rebuilt[variant]["sha256"] == manifest[variant]["sha256"], variant


@pytest.mark.parametrize("variant", ["seed", "fixed", "upstream", "seed-elf", "fixed-elf",
                                     "upstream-elf"])
def test_profile_symbols_resolve(variant: str) -> None:
    profile = load_profile(variant)
    image = load_image(profile.image, profile.kernel.load_base)
    for name in (profile.kernel.success_symbol, profile.kernel.snapshot_symbol,
                 profile.kernel.stack_base_symbol, profile.heap.alloc_symbol,
                 profile.heap.dealloc_symbol, profile.heap.free_list_symbol):
        assert image.symbol(name).address
    assert image.describe(image.symbol(profile.heap.alloc_symbol).address + 4).endswith("+0x4")
