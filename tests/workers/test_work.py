"""The farm's work functions, run in this process against a real Redis and the real kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.conftest import RedisServer
from workers import work
from workers.settings import Settings
from workers.store import FarmStore

pytestmark = pytest.mark.redis

EXAMPLES = Path(__file__).parents[2] / "fuzzfarm" / "examples"
SEED_BUG = (EXAMPLES / "vaddr-0x300028.elf").read_bytes()


@pytest.fixture
def settings(redis_server, tmp_path: Path) -> Settings:
    return Settings(redis_url=redis_server.url, cache_dir=tmp_path / "cache",
                    minimize_executions=600)


def test_triage_buckets_the_seed_bug_once_per_input(store: FarmStore,
                                                    settings: Settings) -> None:
    sent: list[str] = []
    sha = store.blobs.put(SEED_BUG)
    store.triage.pending([sha], "seed")
    first = work.triage_input(store, settings, sha, "seed", sent.extend)
    again = work.triage_input(store, settings, sha, "seed", sent.extend)  # delivered twice
    assert first["state"] == "crash" and first["new"] and first["minimize"]
    assert again == {**first, "new": False, "minimize": False}
    assert sent == [first["bucket"]]  # one minimization for a new bucket
    bucket = store.buckets.get(first["bucket"])
    assert bucket is not None and bucket.count == 1 and bucket.kernel == "seed"
    report = store.reports.get(sha, "seed")
    assert report is not None
    assert any(f["field"] == "segments[0].vaddr" for f in report["findings"])
    assert any(s["vaddr"] == 0x300028 for s in report["segments"])
    assert store.triage.backlog() == 0  # nothing left pending


def test_one_triage_task_takes_a_slice_s_inputs_together(store: FarmStore,
                                                         settings: Settings) -> None:
    sent: list[str] = []
    junk = b"\x7fELF" + bytes(60)
    shas = store.blobs.put_many([SEED_BUG, junk])
    store.triage.pending([*shas, "0" * 64], "seed")
    out = work.triage_inputs(store, settings, "seed", [*shas, "0" * 64], sent.extend)
    assert [o["state"] for o in out] == ["crash", "rejected", "missing"]
    assert sent == [out[0]["bucket"]]
    assert store.reports.get(shas[0], "seed") and store.reports.get(shas[1], "seed")
    assert store.triage.backlog() == 0
    assert store.stats.counters()["harness_errors"] == 1  # the missing input, never a bucket
    assert store.stats.harness_errors()[0].input == "0" * 64
    assert len(store.buckets.all()) == 1


def test_garbage_for_triage_is_rejected_not_fatal(store: FarmStore, settings: Settings) -> None:
    for junk in (b"", b"not an elf at all", b"\x7fELF" + bytes(200)):
        sha = store.blobs.put(junk)
        out = work.triage_input(store, settings, sha, "seed", lambda _b: None)
        assert out["state"] in ("rejected", "harness-error"), out
    assert store.buckets.all() == []
    assert work.triage_input(store, settings, "0" * 64, "seed", lambda _b: None) == \
        {"state": "missing"}
    assert store.stats.counters().get("harness_errors") == 1  # the missing input, as ours


def test_minimize_then_verify_on_fixed(store: FarmStore, settings: Settings) -> None:
    sha = store.blobs.put(SEED_BUG)
    bid = work.triage_input(store, settings, sha, "seed", lambda _b: None)["bucket"]
    out = work.minimize_bucket(store, settings, bid)
    assert out["state"] == "minimized", out
    bucket = store.buckets.get(bid)
    assert bucket is not None and bucket.minimized_size is not None
    assert bucket.minimized_size < len(SEED_BUG)
    again = work.minimize_bucket(store, settings, bid)
    again_bucket = store.buckets.get(bid)
    assert again_bucket is not None and again_bucket.minimized_size is not None
    assert again_bucket.minimized_size <= bucket.minimized_size  # never grows
    assert again_bucket.minimize_queued is None and again_bucket.minimize_done
    assert again["state"] == "minimized"
    assert work.verify_bucket(store, settings, bid, "fixed")["state"] == "fixed"
    assert work.verify_bucket(store, settings, bid, "seed")["state"] == "reproduces"
    verified = store.buckets.get(bid)
    assert verified is not None
    verify = verified.verify
    assert verify["fixed"]["state"] == "fixed" and verify["seed"]["state"] == "reproduces"


def test_a_hang_the_watchdog_stops_elsewhere_is_minimized_as_triage_judged_it(
        store: FarmStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endless loop (RX-06) that the watchdog stops in another function of the loop than
    the full budget does. Its cause is in the input (a program-header stride of 0), so
    triage and the minimizer's snapshot executor, which stops stalled runs early, file it
    under that cause alike, and it is minimized without a harness error. (A fuzzing job's
    input, kept as it was found, under the interval it was found with: where a checkpoint
    stops the loop depends on it.)"""
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    found_with = 200_000
    monkeypatch.setattr(work, "WATCHDOG", found_with)
    data = (Path(__file__).parent / "data" / "watchdog-hang.elf").read_bytes()
    seed = load_profile("seed")
    stopped = Executor(seed, watchdog=found_with, causes=False)
    full = Executor(seed, causes=False)
    early = stopped.run(data)
    assert stopped.stalled_at and early.signature != full.run(data).signature  # the case
    sha = store.blobs.put(data)
    bid = work.triage_input(store, settings, sha, "seed", lambda _b: None)["bucket"]
    bucket = store.buckets.get(bid)
    assert bucket is not None
    assert bucket.signature == "unchecked-field | ELF header | e_phentsize"
    out = work.minimize_bucket(store, settings, bid)
    assert out["state"] == "minimized", out
    assert store.stats.counters().get("harness_errors", 0) == 0
    minimized = store.buckets.get(bid)
    assert minimized is not None and minimized.minimized is not None
    report = store.reports.get(minimized.minimized, "seed")
    assert report is not None and report["signature"] == bucket.signature
    assert report["findings"][1]["class"] == "hang"
    assert work.verify_bucket(store, settings, bid, "fixed")["state"] == "fixed"


def test_a_bucket_filed_before_its_cause_was_named_still_reproduces(
        store: FarmStore, settings: Settings) -> None:
    """A bucket an older farm filed under the consequence (a hang) of what is now named as its
    cause: verify says it reproduces where that hang still comes, and fixed where not."""
    from fuzz.solutions import bucket_id
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    data = (Path(__file__).parent / "data" / "watchdog-hang.elf").read_bytes()
    old = Executor(load_profile("seed"), snapshot=False, causes=False).run(data)
    assert old.crash_class == "hang" and old.signature is not None
    sha = store.blobs.put(data)
    bid = bucket_id(old.signature)
    store.buckets.upsert(bid, old.signature, "hang", "seed", sha, len(data), {})
    seed = work.verify_bucket(store, settings, bid, "seed")
    assert seed["state"] == "reproduces" and seed["class"] == "unchecked-field", seed
    assert work.verify_bucket(store, settings, bid, "fixed")["state"] == "fixed"
    # minimized it is not, under a signature triage no longer gives it; nor is that the
    # farm failing
    out = work.minimize_bucket(store, settings, bid)
    assert out["state"] == "signature changed"
    assert out["error"].endswith("another signature: unchecked-field | ELF header | e_phentsize")
    bucket = store.buckets.get(bid)
    assert bucket is not None and bucket.minimize_error == out["error"]
    assert store.stats.counters().get("harness_errors", 0) == 0


def test_a_users_kernel_build_is_added_once_and_booted_by_sha(store: FarmStore,
                                                              settings: Settings,
                                                              tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from kernel_emu.profile import PROFILE_DIR
    from workers.kernels import materialize

    build = tmp_path / "build"
    (build / "out").mkdir(parents=True)
    # a UEFI application and its link map, as a kernel developer's build leaves them
    shutil.copy(PROFILE_DIR.parent / "images" / "fixed.efi", build / "out" / "rustux.efi")
    shutil.copy(PROFILE_DIR.parent / "images" / "fixed.map", build / "out" / "rustux.map")
    profile = (PROFILE_DIR / "fixed.toml").read_text()
    profile = profile.replace('image = "../images/fixed.efi"', 'image = "out/rustux.efi"')
    profile = profile.replace('name = "fixed"', 'name = "my-build"')
    (build / "my-build.toml").write_text(profile)
    url = ["--redis-url", settings.redis_url]
    add = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "kernel", "add",
                          str(build / "my-build.toml"), *url], capture_output=True, text=True,
                         timeout=120)
    assert add.returncode == 0, add.stderr
    listing = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "kernel", "list", *url],
                             capture_output=True, text=True, timeout=120)
    assert "my-build" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "kernel", "add",
                          str(build / "missing.toml"), *url], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    entry = store.kernels.get("my-build")
    assert entry is not None
    # the profile as uploaded, comments and all, with only its image renamed
    assert entry.profile == profile.replace('image = "out/rustux.efi"', 'image = "image.efi"')
    # a worker boots the uploaded bytes, not the files on this machine
    (build / "out" / "rustux.efi").unlink()
    (build / "out" / "rustux.map").unlink()
    loaded = materialize(store, "my-build", settings.cache_dir)
    assert loaded.image.read_bytes() == (PROFILE_DIR.parent / "images" / "fixed.efi").read_bytes()
    sha = store.blobs.put(SEED_BUG)
    assert work.triage_input(store, settings, sha, "my-build", lambda _b: None)["state"] == "ok"


def _stream_with_a_finding(store: FarmStore, tmp_path: Path,
                           enqueue: work.Enqueue) -> tuple[work.SliceStream, str]:
    """A slice's stream over a work folder in which its job has recorded one crashing input."""
    from fuzz.solutions import bucket_id
    from workers.store import sha256

    folder = tmp_path / "work" / "solutions" / bucket_id("a signature new to the farm")
    folder.mkdir(parents=True)
    (folder / f"{sha256(SEED_BUG)}.elf").write_bytes(SEED_BUG)
    stream = work.SliceStream(store, "s1", "c1", "seed", tmp_path / "work",
                              tmp_path / "corpus-cache", set(), enqueue)
    return stream, sha256(SEED_BUG)


def test_a_finding_a_full_redis_refused_is_sent_once_there_is_room(
        store: FarmStore, redis_server: RedisServer, tmp_path: Path) -> None:
    sent: list[tuple[str, list[str]]] = []
    stream, sha = _stream_with_a_finding(store, tmp_path, lambda k, s: sent.append((k, s)))
    # maxmemory under what Redis holds, with noeviction: writes refused, reads answered
    redis_server.cli("config", "set", "maxmemory", "1")
    try:
        stream.tick()  # the input cannot be stored: the slice carries on
    finally:
        redis_server.cli("config", "set", "maxmemory", "0")
    assert store.triage.waiting() == [] and sent == []
    stream.flush(None, final=True)  # the slice's end, Redis with room again
    assert store.triage.waiting() == [(sha, "seed")] and sent == [("seed", [sha])]


def test_a_finding_goes_to_triage_later_when_the_broker_is_away(store: FarmStore,
                                                                tmp_path: Path) -> None:
    from workers.app import make_app
    from workers.local import free_port

    # a real Celery app whose broker is a port nothing listens on
    away = make_app(Settings(redis_url=f"redis://127.0.0.1:{free_port(0)}/0"))
    stream, sha = _stream_with_a_finding(
        store, tmp_path, lambda k, s: away.send_task("workers.tasks.triage_many", args=[k, s]))
    stream.tick()  # the slice goes on fuzzing
    # pending: the controller sends it to triage after the grace
    assert store.triage.waiting() == [(sha, "seed")]
    assert stream.findings == 1
    stream.flush(None, final=True)
    assert store.triage.waiting() == [(sha, "seed")]  # sent once, not again


# crosscheck on real firmware ----------------------------------------------------------------

def _uefi_bucket(store: FarmStore, settings: Settings) -> str:
    sha = store.blobs.put(SEED_BUG)
    return str(work.triage_input(store, settings, sha, "seed", lambda _b: None)["bucket"])


def test_a_bucket_s_input_reproduces_on_qemu_and_ovmf(store: FarmStore,
                                                      settings: Settings) -> None:
    from kernel_emu import qemu

    if qemu.missing():
        pytest.skip(qemu.missing())
    bid = _uefi_bucket(store, settings)
    out = work.crosscheck_bucket(store, settings, bid)
    print(f"\n{out}")
    assert out["state"] == "yes", out
    bucket = store.buckets.get(bid)
    assert bucket is not None and bucket.crosscheck == out
    assert out["input"] == bucket.reproducer and out["lines"] >= 10
    assert out["differences"] == [] and out["real_ended"] != "timeout"


def test_a_crosscheck_is_queued_once_per_input(store: FarmStore, settings: Settings) -> None:
    bid = _uefi_bucket(store, settings)
    bucket = store.buckets.get(bid)
    assert bucket is not None and bucket.crosscheck is None  # "not run" on the dashboard
    assert store.buckets.queue_crosscheck(bid, bucket.reproducer)
    assert not store.buckets.queue_crosscheck(bid, bucket.reproducer)
    assert store.buckets.queue_crosscheck(bid, bucket.reproducer, again=True)  # the button
    assert store.buckets.queue_crosscheck(bid, "0" * 64)  # a smaller input came since
    assert not store.buckets.queue_crosscheck("0" * 16, bucket.reproducer)  # no such bucket
    queued = store.buckets.get(bid)
    assert queued is not None and queued.crosscheck is not None
    assert queued.crosscheck["state"] == "queued"


def test_a_crosscheck_of_an_elf_build_is_not_run(store: FarmStore,
                                                 settings: Settings) -> None:
    sha = store.blobs.put(SEED_BUG)
    from kernel_emu.profile import PROFILE_DIR
    from workers.kernels import add_kernel

    add_kernel(store, PROFILE_DIR / "seed-elf.toml")
    elf = work.triage_input(store, settings, sha, "seed-elf", lambda _b: None)["bucket"]
    out = work.crosscheck_bucket(store, settings, elf)
    assert out["state"] == "not-run" and "'seed-elf' is no UEFI application" in out["reason"]
    assert store.stats.counters().get("harness_errors", 0) == 0


def test_a_crosscheck_without_firmware_says_why_and_is_no_finding(
        store: FarmStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    bid = _uefi_bucket(store, settings)
    monkeypatch.setenv("FUZZFARM_OVMF", str(settings.cache_dir / "no-such-firmware.fd"))
    out = work.crosscheck_bucket(store, settings, bid)
    assert out["state"] == "not-run" and "OVMF firmware not found" in out["reason"]
    assert store.stats.counters().get("harness_errors", 0) == 0
    assert work.crosscheck_bucket(store, settings, "0" * 16) == {"state": "unknown bucket"}
