"""One farm state for all dashboard tests: a real Redis server filled by a real triage and
minimization of the seed bug, a bucket whose report carries hostile text, a campaign with a
time series and a small corpus."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from dashboard.app import create_app
from kernel_emu import qemu
from tests.workers.conftest import RedisServer, running_redis
from workers import work
from workers.kernels import ensure_builtin
from workers.settings import Settings
from workers.store import FarmStore, sha256

ROOT = Path(__file__).parents[2]
SEED_BUG = (ROOT / "fuzzfarm" / "examples" / "vaddr-0x300028.elf").read_bytes()
HOSTILE_LOG = "[boot] hello\n<script>alert(1)</script><b>x</b>\n[PANIC] <i>boom</i> at a.rs:1\n"
HOSTILE_ELF = b"<b>not an elf</b><script>alert(3)</script>"
HOSTILE_SIGNATURE = "kernel-panic | <img src=x onerror=alert(2)> | x"


# screenshots the browser tests saved in this run, listed at the end of the run
SCREENSHOTS: list[Path] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SCREENSHOTS:
        terminalreporter.section("dashboard screenshots")
        for path in SCREENSHOTS:
            terminalreporter.write_line(str(path))


@dataclass
class FarmData:
    server: RedisServer
    store: FarmStore
    settings: Settings
    seed_sha: str
    bucket: str
    hostile_bucket: str
    hostile_sha: str
    campaign: str
    sent: list[tuple[str, list[Any]]]


@pytest.fixture(scope="session")
def farm_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmData]:
    tmp = tmp_path_factory.mktemp("dashboard-farm")
    with running_redis(tmp / "redis") as server:
        store = FarmStore.connect(server.url)
        ensure_builtin(store)
        settings = Settings(redis_url=server.url, cache_dir=tmp / "cache",
                            minimize_executions=600)
        sha = store.blobs.put(SEED_BUG)
        out = work.triage_input(store, settings, sha, "seed", lambda _b: None)
        assert out["state"] == "crash", out
        minimized = work.minimize_bucket(store, settings, out["bucket"])
        assert minimized["state"] == "minimized", minimized
        if qemu.missing() is None:  # the minimized input on real firmware, as a worker runs it
            crosscheck = work.crosscheck_bucket(store, settings, out["bucket"])
            assert crosscheck["state"] == "yes", crosscheck

        # a bucket whose report and input carry markup, as a fuzzed input can make them
        hostile_sha = store.blobs.put(HOSTILE_ELF)
        report = dict(store.reports.get(sha, "seed") or {})
        report.update(log=HOSTILE_LOG, signature=HOSTILE_SIGNATURE, crash_class="kernel-panic",
                      input_sha256=hostile_sha, findings=[{
                          "class": "kernel-panic", "evidence": ["<b>evidence</b> & more"],
                          "frames": ["<svg onload=alert(4)>"], "field": "<u>f</u>",
                          "pc": None, "signature": HOSTILE_SIGNATURE}])
        store.reports.put(hostile_sha, "seed", report)
        hostile_bucket = sha256(HOSTILE_SIGNATURE.encode())[:16]
        store.buckets.upsert(hostile_bucket, HOSTILE_SIGNATURE, "kernel-panic", "seed",
                            hostile_sha, len(HOSTILE_ELF), {"input": hostile_sha,
                                                            "evidence": ["<b>sample</b>"]})

        cid = store.campaigns.create("seed", 2, 30.0)
        now = time.time()
        for i in range(12):
            store.stats.add_series_point(cid, {
                "t": now - 600 + 50 * i, "execs": 1000 * i * i,
                "execs_per_second": 40.0 + 3 * i, "edges": 300 + 10 * i, "corpus": 5 + i,
                "buckets": 1 + i // 6, "workers": 2})
        # what its finished slices added up to
        sid = store.campaigns.new_slice(cid, "seed", 30.0)
        store.campaigns.claim_slice(sid, "w1@test")
        store.campaigns.finish_slice(sid, cid, {"execs": 121000, "edges": 410})
        store.stats.heartbeat("w1@test", "fuzz", "abc")
        store.corpus.add("seed", [p.read_bytes() for p in
                                  sorted((ROOT / "corpus" / "seeds").glob("*.elf"))[:3]])
        yield FarmData(server, store, settings, sha, out["bucket"], hostile_bucket,
                       hostile_sha, cid, [])


@pytest.fixture(scope="session")
def app(farm_data: FarmData) -> Flask:
    def send(name: str, args: list[Any]) -> None:
        farm_data.sent.append((name, args))

    return create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                      coverage_sample=4, send_task=send)
