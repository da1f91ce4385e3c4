"""Names from Redis never lead a worker or the dashboard outside its cache: hostile kernel
names, image ids, profiles, corpus entries and slice ids written into a real Redis through the
store end as harness errors (or 404s), and the cache folder must be the user's own."""

from __future__ import annotations

import os
import secrets
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_emu.errors import HarnessError
from tests.workers.conftest import RedisServer
from workers import coverage, work
from workers.kernels import STORED_EFI, KernelError, materialize
from workers.paths import (
    KERNEL_NAME,
    SHA256,
    SLICE_ID,
    UnsafeCache,
    UnsafeName,
    checked,
    private_dir,
)
from workers.settings import Settings
from workers.store import FarmStore

EXAMPLES = Path(__file__).parents[2] / "fuzzfarm" / "examples"
# a file each hostile name below would create or read if it were used as a path
TARGET = Path("/tmp") / f"fuzzfarm-escaped-{secrets.token_hex(6)}"
HOSTILE = [
    "../" * 20 + str(TARGET)[1:], str(TARGET), "../../etc/passwd", "/etc/passwd", "..",
    "seed/../../x", "seed\0x", "seed\n", "a" * 5000, "", " seed", "seed.toml/..",
]


def test_only_whole_matches_pass() -> None:
    assert checked("kernel build name", KERNEL_NAME, "my-build_2.1") == "my-build_2.1"
    assert checked("input id", SHA256, "ab" * 32) == "ab" * 32
    assert checked("slice id", SLICE_ID, "0123456789ab") == "0123456789ab"
    for name in HOSTILE:
        with pytest.raises(UnsafeName, match="bad kernel build name"):
            checked("kernel build name", KERNEL_NAME, name)
    for sha in ("AB" * 32, "ab" * 32 + "\n", "ab" * 31, "ab" * 33, "../" + "a" * 61, None, 7):
        with pytest.raises(UnsafeName):
            checked("input id", SHA256, sha)
    with pytest.raises(UnsafeName) as caught:
        checked("kernel build name", KERNEL_NAME, "x" * 5000)
    assert len(str(caught.value)) < 120  # a hostile name does not flood the error record
    assert issubclass(UnsafeName, HarnessError)  # the farm's error, never a finding


def test_the_cache_folder_must_be_private(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "cache")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert private_dir(made) == made
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeCache, match="writable by others"):
        private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(UnsafeCache, match="not a folder"):
        private_dir(link)
    if os.getuid() == 0:  # only root can give a folder away to show the other case
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UnsafeCache, match="belongs to another user"):
            private_dir(theirs)


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Path]:
    """A folder holding nothing but the cache: whatever appears beside it escaped."""
    root = tmp_path / "jail"
    root.mkdir()
    yield root / "cache"
    assert [p.name for p in root.iterdir()] in ([], ["cache"])
    assert not list(TARGET.parent.glob(f"{TARGET.name}*"))
    for path in (root / "cache").rglob("*"):
        assert path.resolve().is_relative_to((root / "cache").resolve()), path


@pytest.fixture
def settings(redis_server: RedisServer, jail: Path) -> Settings:
    return Settings(redis_url=redis_server.url, cache_dir=jail, minimize_executions=50)


def _seed_entry(store: FarmStore) -> tuple[str, str]:
    entry = store.kernels.get("seed")
    assert entry is not None
    return entry.profile, entry.image


@pytest.mark.redis
def test_hostile_kernel_names_are_harness_errors(store: FarmStore, settings: Settings) -> None:
    profile, image = _seed_entry(store)
    sha = store.blobs.put((EXAMPLES / "vaddr-0x300028.elf").read_bytes())
    bid = work.triage_input(store, settings, sha, "seed", lambda _b: None)["bucket"]
    for name in HOSTILE:
        store.kernels.put(name, profile, image, "hostile")
        with pytest.raises(UnsafeName):
            materialize(store, name, settings.cache_dir)
        out = work.triage_inputs(store, settings, name, [sha], lambda _b: None)
        assert out == [{"state": "harness-error", "error": f"bad kernel build name {name!r:.80}"}]
        assert work.verify_bucket(store, settings, bid, name)["state"] == "harness-error"
        with pytest.raises(HarnessError):
            coverage.run_sample(store, settings, name, 2)
    assert len(store.buckets.all()) == 1  # never a finding
    assert store.stats.counters().get("harness_errors", 0) >= 2 * len(HOSTILE)


@pytest.mark.redis
def test_a_build_s_image_id_and_profile_cannot_point_elsewhere(
        store: FarmStore, settings: Settings) -> None:
    profile, image = _seed_entry(store)
    for bad in ("../" * 20 + str(TARGET)[1:], "/etc/passwd", image + "\n", image[:16]):
        store.kernels.put("evil", profile, bad, "")
        with pytest.raises(UnsafeName, match="image sha256 of kernel build 'evil'"):
            materialize(store, "evil", settings.cache_dir)
    for where in (str(TARGET), "/etc/passwd", "../" * 20 + str(TARGET)[1:],
                  "../seed/image.efi", "image.map"):
        assert tomllib.loads(profile)["image"] == STORED_EFI
        store.kernels.put("evil", profile.replace(f'"{STORED_EFI}"', f'"{where}"'), image, "")
        with pytest.raises(KernelError, match="its stored profile names the image"):
            materialize(store, "evil", settings.cache_dir)
    store.kernels.put("evil", "image = [", image, "")
    with pytest.raises(KernelError, match="not TOML"):
        materialize(store, "evil", settings.cache_dir)


@pytest.mark.redis
def test_corpus_entries_that_are_no_input_ids_are_left_out(store: FarmStore,
                                                           settings: Settings) -> None:
    from workers.store.corpus import corpus_key

    good = (EXAMPLES / "three-segments.elf").read_bytes()
    store.corpus.add("seed", [good])
    # nothing in the farm writes these: a raw client stands for whoever else can
    raw = store._conn.client  # noqa: SLF001
    raw.zadd(corpus_key("seed"), dict.fromkeys(HOSTILE[:-3] + ["ab" * 32 + "\n"], 1.0))
    cache = settings.cache_dir / "corpus" / "seed"
    seeds = settings.cache_dir / "work" / "seeds"
    sample = work._sync_corpus(store, "seed", cache, seeds)
    assert sample == {store.blobs.put(good)}
    assert [p.name for p in seeds.iterdir()] == list(sample)
    errors = [e for e in store.stats.harness_errors() if e.where == "corpus of seed"]
    assert len(errors) == 1 and "entries are no input ids" in errors[0].error


@pytest.mark.redis
def test_hostile_slice_ids_and_slice_kernels_name_no_folder(store: FarmStore,
                                                            settings: Settings) -> None:
    from workers.store.campaigns import slice_key

    cid = store.campaigns.create("seed", 1, 5.0)
    raw = store._conn.client  # noqa: SLF001
    for sid in ("../" * 20 + str(TARGET)[1:], "../x", "0123456789ab\n", "a" * 5000):
        raw.hset(slice_key(sid), mapping={"id": sid, "campaign": cid, "kernel": "seed",
                                          "seconds": 5.0, "state": "queued", "queued": 0})
        with pytest.raises(UnsafeName, match="bad slice id"):
            work.run_fuzz_slice(store, settings, sid, "w@test", lambda *_a: None)
    bad = store.campaigns.create("../../../../../../..", 1, 5.0)
    sid = store.campaigns.new_slice(bad, "../../../../../../..", 5.0)
    with pytest.raises(UnsafeName, match="bad kernel build name"):
        work.run_fuzz_slice(store, settings, sid, "w@test", lambda *_a: None)
