"""A kernel build's profile as workers get it: the user's TOML with its image renamed; the
image they boot, checked against its sha256 whenever it is loaded and when it is uploaded."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kernel_emu.profile import PROFILE_DIR
from tests.workers.conftest import ROOT, RedisServer
from workers import work
from workers.kernels import (
    STORED_EFI,
    STORED_IMAGE,
    KernelError,
    add_kernel,
    materialize,
    stored_profile,
)
from workers.paths import UnsafeName
from workers.settings import Settings
from workers.store import FarmStore, sha256
from workers.store.blobs import blob_key


def test_only_the_image_changes_in_the_builtin_profiles() -> None:
    for name, image, stored_as in (("seed", "seed.efi", STORED_EFI),
                                   ("fixed", "fixed.efi", STORED_EFI),
                                   ("seed-elf", "seed.elf", STORED_IMAGE)):
        path = PROFILE_DIR / f"{name}.toml"
        text = path.read_text()
        stored = stored_profile(text, path, stored_as)
        changed = [(a, b) for a, b in zip(text.splitlines(), stored.splitlines(), strict=True)
                   if a != b]
        assert changed == [(f'image = "../images/{image}"', f'image = "{stored_as}"')]
        assert tomllib.loads(stored) == {**tomllib.loads(text), "image": stored_as}


def test_comments_layout_and_odd_spellings_survive() -> None:
    text = ('# my build\nname = "mine"  # the name\n\nimage   =   \'out/k.elf\'\n'
            'description = """two\nlines"""\n\n[heap]\nbase = 0x300000 # heap\n')
    stored = stored_profile(text, Path("mine.toml"))
    assert "# my build" in stored and "# the name" in stored and "# heap" in stored
    assert "base = 0x300000" in stored and '"""two\nlines"""' in stored
    assert tomllib.loads(stored)["image"] == STORED_IMAGE


def test_an_image_key_in_a_table_is_not_the_profile_s_image() -> None:
    text = 'name = "x"\n\n[notes]\nimage = "a picture"\n'
    with pytest.raises(KernelError, match="no top-level image"):
        stored_profile(text, Path("x.toml"))


def test_a_profile_that_is_no_toml_is_refused_in_one_line() -> None:
    with pytest.raises(KernelError, match="x.toml"):
        stored_profile('name = "x"\nimage = \n', Path("x.toml"))


# what workers boot: the build's bytes, checked at every load ----------------------------------

SEED_BUG = (ROOT / "fuzzfarm" / "examples" / "vaddr-0x300028.elf").read_bytes()


@pytest.mark.redis
def test_a_cached_image_changed_since_is_fetched_again_not_booted(
        store: FarmStore, redis_server: RedisServer, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_server.url, cache_dir=tmp_path / "cache")
    entry = store.kernels.get("seed")
    assert entry is not None
    profile = materialize(store, "seed", settings.cache_dir)
    assert sha256(profile.image.read_bytes()) == entry.image
    # another build's image in its place, a valid kernel without the seed bug, and a profile
    # edited to load something else: what the worker loads must still be the build's own
    profile.image.write_bytes((ROOT / "kernel_emu" / "images" / "fixed.efi").read_bytes())
    profile.source.write_text(profile.source.read_text().replace(
        f'image = "{STORED_EFI}"', 'image = "/etc/hostname"'))
    sha = store.blobs.put(SEED_BUG)
    (out,) = work.triage_inputs(store, settings, "seed", [sha], lambda _b: None)
    assert out["state"] == "crash", out  # the seed build's bug: it booted the seed image
    assert sha256(profile.image.read_bytes()) == entry.image
    assert f'image = "{STORED_EFI}"' in profile.source.read_text()


@pytest.mark.redis
def test_a_damaged_image_in_redis_and_in_the_cache_is_a_harness_error(
        store: FarmStore, tmp_path: Path) -> None:
    entry = store.kernels.get("seed")
    assert entry is not None
    profile = materialize(store, "seed", tmp_path / "cache")
    profile.image.write_bytes(b"not the image")
    raw = store._conn.client  # noqa: SLF001 - what something outside the farm could write
    raw.set(blob_key(entry.image), b"not the image either")
    with pytest.raises(KernelError, match="does not match its sha256"):
        materialize(store, "seed", tmp_path / "cache")


def _profile_copy(tmp_path: Path) -> Path:
    """A user's profile of the seed build, in a folder of its own."""
    text = (PROFILE_DIR / "seed.toml").read_text().replace(
        'image = "../images/seed.efi"', f'image = "{ROOT / "kernel_emu" / "images" / "seed.efi"}"')
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('name = "seed"', 'name = "mine"'))
    return path


@pytest.mark.redis
def test_kernel_add_checks_what_redis_keeps(store: FarmStore, tmp_path: Path) -> None:
    image = (ROOT / "kernel_emu" / "images" / "seed.efi").read_bytes()
    raw = store._conn.client  # noqa: SLF001
    raw.set(blob_key(sha256(image)), b"planted under the image's name")
    assert add_kernel(store, _profile_copy(tmp_path)) == "mine"
    assert store.blobs.get(sha256(image)) == image  # replaced, not kept as found
    entry = store.kernels.get("mine")
    assert entry is not None and entry.image == sha256(image)


@pytest.mark.redis
def test_kernel_add_with_a_sha256_uploads_only_that_image(store: FarmStore,
                                                          redis_server: RedisServer,
                                                          tmp_path: Path) -> None:
    profile = _profile_copy(tmp_path)
    image_sha = sha256((ROOT / "kernel_emu" / "images" / "seed.efi").read_bytes())

    def add(sha: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "kernel", "add",
                               str(profile), "--sha256", sha, "--redis-url", redis_server.url],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    wrong = add("0" * 64)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert f"its sha256 is {image_sha}, not {'0' * 64}" in wrong.stderr
    assert "mine" not in store.kernels.names()
    right = add(image_sha.upper())
    assert right.returncode == 0, right.stderr
    assert f"added kernel build 'mine' (image sha256 {image_sha})" in right.stdout


# a UEFI application as a farm kernel: the image and the link map its symbols come from -------

IMAGES = ROOT / "kernel_emu" / "images"


@pytest.mark.redis
def test_a_uefi_build_travels_with_its_link_map(
        store: FarmStore, redis_server: RedisServer, tmp_path: Path) -> None:
    assert add_kernel(store, PROFILE_DIR / "seed.toml") == "seed"  # as it was: no change
    entry = store.kernels.get("seed")
    image, link_map = (IMAGES / "seed.efi").read_bytes(), (IMAGES / "seed.map").read_bytes()
    assert entry is not None and entry.image == sha256(image) and entry.map == sha256(link_map)
    assert tomllib.loads(entry.profile)["image"] == STORED_EFI
    debug = (IMAGES / "seed.debug").read_bytes()  # the source lines, for the dashboard
    assert entry.debug == sha256(debug) and store.blobs.get(entry.debug) == debug
    assert store.kernels.image_files(entry.image) == {"map": entry.map, "debug": entry.debug}
    settings = Settings(redis_url=redis_server.url, cache_dir=tmp_path / "cache")
    profile = materialize(store, "seed", settings.cache_dir)
    assert profile.image.name == STORED_EFI
    assert profile.image.read_bytes() == image
    assert profile.image.with_suffix(".map").read_bytes() == link_map
    # a map changed in the worker's cache is written again before anything boots
    profile.image.with_suffix(".map").write_text("nothing\n")
    sha = store.blobs.put(SEED_BUG)
    (out,) = work.triage_inputs(store, settings, "seed", [sha], lambda _b: None)
    assert out["state"] == "crash", out
    assert profile.image.with_suffix(".map").read_bytes() == link_map
    bucket = store.buckets.get(out["bucket"])
    assert bucket is not None and "rustux::" in bucket.signature  # names from the map


@pytest.mark.redis
def test_a_uefi_build_without_its_map_is_refused_in_one_line(
        store: FarmStore, tmp_path: Path) -> None:
    (tmp_path / "k.efi").write_bytes((IMAGES / "seed.efi").read_bytes())
    text = (PROFILE_DIR / "seed.toml").read_text().replace(
        'image = "../images/seed.efi"', 'image = "k.efi"').replace('name = "seed"', 'name = "mine"')
    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(KernelError, match=r"k\.map.*cannot be read"):
        add_kernel(store, tmp_path / "mine.toml")
    assert store.kernels.get("mine") is None


@pytest.mark.redis
def test_a_stored_map_id_is_checked_before_it_names_a_file(
        store: FarmStore, tmp_path: Path) -> None:
    entry = store.kernels.get("seed")
    assert entry is not None
    for bad in ("", "../../etc/passwd", entry.map[:16]):
        store.kernels.put("evil", entry.profile, entry.image, "", bad)
        with pytest.raises(UnsafeName, match="link-map sha256 of kernel build 'evil'"):
            materialize(store, "evil", tmp_path / "cache")
    store.kernels.put("evil", entry.profile, entry.image, "", sha256(b"no such map"))
    with pytest.raises(KernelError, match="its link map is missing from Redis"):
        materialize(store, "evil", tmp_path / "cache")
