"""The farm with real processes: Redis, Celery workers, the controller, job processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reproducers import REPRODUCERS
from tests.workers.conftest import ROOT, Farm, RedisServer, wait_for
from workers.app import make_app
from workers.local import url_from_status
from workers.settings import Settings
from workers.store import FarmStore

pytestmark = [pytest.mark.redis, pytest.mark.farm]

EXAMPLES = ROOT / "fuzzfarm" / "examples"


def _vaddr_buckets(store: FarmStore) -> list[str]:
    out = []
    for b in store.buckets.all():
        report = store.reports.get(b.reproducer, b.kernel) or {}
        if any(f["class"] == "vaddr-corruption" for f in report.get("findings", [])):
            out.append(b.id)
    return out


def _cli(url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", *args, "--redis-url", url],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _settled(store: FarmStore) -> bool:
    """No triage pending and no minimization queued or running: a bucket's `minimize_queued`
    is set by the triage that queues one, before that triage stops being pending."""
    return store.triage.backlog() == 0 and all(
        b.minimize_queued is None for b in store.buckets.all())


@pytest.mark.slow
def test_a_campaign_buckets_minimizes_and_verifies_the_seed_bug(farm: Farm,
                                                                store: FarmStore) -> None:
    farm.worker("w1")
    farm.controller()
    cid = store.campaigns.create("seed", 1, 6)

    def minimized_vaddr_bucket() -> list[str]:
        return [b for b in _vaddr_buckets(store)
                if (bucket := store.buckets.get(b)) is not None and bucket.minimized]

    wait_for(minimized_vaddr_bucket, 150, "a minimized bucket with vaddr-corruption")
    campaign = store.campaigns.get(cid)
    assert campaign is not None and campaign.execs > 0 and campaign.slices_done >= 1
    assert store.corpus.size("seed") > 0  # slices pushed new inputs back
    stop = _cli(farm.url, "campaign", "stop", cid)
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: store.campaigns.state(cid) == "stopped", 60, "the campaign to stop")
    wait_for(lambda: _settled(store), 300, "triage and minimization to drain")
    target = minimized_vaddr_bucket()[0]
    again = _cli(farm.url, "minimize", "--bucket", target)
    assert again.returncode == 0, again.stderr
    assert "minimized" in again.stdout and target in again.stdout
    verify = _cli(farm.url, "verify", "--kernel", "fixed")
    assert verify.returncode == 0, verify.stderr
    for b in store.buckets.all():
        assert b.verify["fixed"]["state"] == "fixed", (b.signature, b.verify)
    listing = _cli(farm.url, "buckets", "--json")
    assert {b["id"] for b in json.loads(listing.stdout)} == {b.id for b in store.buckets.all()}
    table = _cli(farm.url, "buckets")
    for b in store.buckets.all():  # one row per bucket, its signature whole
        (row,) = [line for line in table.stdout.splitlines() if line.startswith(b.id)]
        assert b.signature in row and b.crash_class in row
    assert store.stats.counters().get("harness_errors", 0) == 0


def test_garbage_sent_to_triage_never_kills_a_worker(farm: Farm, store: FarmStore) -> None:
    farm.worker("w1")
    app = make_app(Settings(redis_url=farm.url))
    for junk in (b"", b"MZ garbage", os.urandom(3000), b"\x7fELF\x02\x01\x01" + bytes(120)):
        app.send_task("workers.tasks.triage", args=[store.blobs.put(junk), "seed"])
    app.send_task("workers.tasks.triage", args=["f" * 64, "seed"])  # no such input
    app.send_task("workers.tasks.triage", args=["not a sha", "no-such-kernel"])
    app.send_task("workers.tasks.triage_many", args=["seed", "not a list"])
    app.send_task("workers.tasks.sample_coverage", args=["../../etc", "many"])
    good = store.blobs.put((EXAMPLES / "vaddr-0x300028.elf").read_bytes())
    app.send_task("workers.tasks.triage", args=[good, "seed"])
    # the worker takes its queues in turn: wait for every message, not only the last sent
    wait_for(lambda: len(re.findall(r"Task workers\.tasks\.\w+\[\S+\] succeeded",
                                    farm.log("w1"))) == 9, 120, "all nine tasks to end")
    assert len(store.buckets.all()) == 1
    assert farm.procs["w1"].poll() is None
    assert "Traceback" not in farm.log("w1")
    wheres = {e.where for e in store.stats.harness_errors()}
    assert {"triage", "coverage sample of ../../etc"} <= wheres  # ours, never buckets


@pytest.mark.slow
def test_fuzzfarm_up_runs_and_stops_on_ctrl_c_losing_nothing(tmp_path: Path) -> None:
    data = tmp_path / "farm"
    err = (tmp_path / "up.err").open("w")
    env = dict(os.environ, PYTHONPATH=str(ROOT), FUZZFARM_MINIMIZE_EXECUTIONS="1000")
    env.pop("REDIS_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", "up", "--workers", "1",
                           "--slice-seconds", "6", "--data", str(data)],
                          stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        redis_url = wait_for(lambda: url_from_status((tmp_path / "up.err").read_text()), 60,
                             "fuzzfarm up to start Redis")
        store = FarmStore.connect(str(redis_url))
        wait_for(lambda: store.buckets.all(), 120, "a bucket from the local farm")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=180) == 130
    finally:
        if up.poll() is None:
            up.kill()
        err.close()
    log = (tmp_path / "up.err").read_text()
    assert "Traceback" not in log
    # stderr is no terminal: the status is plain lines, no cursor movement
    assert "\x1b[" not in log and re.search(r"^\[\s*\d+s\] workers 1 · execs", log, re.M)
    port = int(str(redis_url).rsplit(":", 1)[1].split("/")[0])
    # everything stopped; the AOF holds what was found
    server = RedisServer(port, data / "redis")
    server.start()
    try:
        reopened = FarmStore.connect(server.url)
        assert reopened.buckets.all()
        assert all(c.state in ("stopping", "stopped") for c in reopened.campaigns.all())
    finally:
        server.stop()


def test_one_triage_task_queues_one_minimization_for_its_new_buckets(
        farm: Farm, store: FarmStore) -> None:
    app = make_app(Settings(redis_url=farm.url))
    base = (EXAMPLES / "three-segments.elf").read_bytes()
    bugs = [r for r in REPRODUCERS if r.bug in ("RX-01", "RX-04")]
    shas = store.blobs.put_many([r.make(base) for r in bugs] + [b"not an ELF at all"])
    store.triage.pending(shas, "seed")
    farm.worker("w1")
    app.send_task("workers.tasks.triage_many", args=["seed", shas])
    succeeded = r"Task workers\.tasks\.minimize_many\[\S+\] succeeded"
    # the log line comes after the task stored its last minimization: wait for it too
    wait_for(lambda: len(store.buckets.all()) >= 2 and _settled(store)
             and re.search(succeeded, farm.log("w1")), 120, "both buckets to be minimized")
    assert all(b.minimized for b in store.buckets.all())
    assert store.reports.get(shas[-1], "seed")["verdict"] == "rejected"
    log = farm.log("w1")
    assert len(re.findall(succeeded, log)) == 1
    assert "Task workers.tasks.minimize[" not in log


def test_a_triage_task_takes_the_inputs_slices_added_while_it_waited(
        farm: Farm, store: FarmStore) -> None:
    """A slice sends a triage task only when none of its build is queued; the one queued
    triages, when it starts, every input pending for the build, its own and the later ones."""
    app = make_app(Settings(redis_url=farm.url))
    base = (EXAMPLES / "three-segments.elf").read_bytes()
    first, later = [store.blobs.put_many([r.make(base)])
                    for r in REPRODUCERS if r.bug in ("RX-01", "RX-04")]
    store.triage.pending(first, "seed")
    assert store.triage.should_send("seed")
    app.send_task("workers.tasks.triage_many", args=["seed", first])
    store.triage.pending(later, "seed")  # a later flush, while that task waits
    assert not store.triage.should_send("seed")
    farm.worker("w1")
    wait_for(lambda: store.triage.backlog() == 0, 120, "both inputs to be triaged")
    assert all(store.reports.get(sha, "seed") for sha in first + later)
    log = farm.log("w1")
    assert len(re.findall(r"Task workers\.tasks\.triage_many\[\S+\] received", log)) == 1
    store.triage.pending(["0" * 64], "seed")
    assert store.triage.should_send("seed")  # the task started: the next flush sends again


def test_the_dashboard_s_coverage_button_runs_the_sample_on_a_worker(
        farm: Farm, store: FarmStore) -> None:
    from dashboard.app import create_app

    store.corpus.add("seed", [p.read_bytes() for p in
                              sorted((ROOT / "corpus" / "seeds").glob("*.elf"))[:2]])
    farm.worker("w1")  # started as `fuzzfarm up` starts its workers: every queue
    app = create_app(farm.url, cache_dir=farm.tmp / "dashboard-cache", coverage_sample=2)
    token = app.extensions["fuzzfarm"]["config"].csrf
    sent = app.test_client().post("/coverage/seed/sample", data={"token": token})
    assert sent.status_code == 303 and "notice=sample" in sent.headers["Location"]
    wait_for(lambda: (store.coverage.job("seed") or {}).get("state") == "done", 120,
             "the worker to sample the coverage")
    record = store.coverage.record("seed")
    assert record is not None and record["inputs"] == 2 and record["blocks"]
    assert re.search(r"Task workers\.tasks\.sample_coverage\[\S+\] succeeded", farm.log("w1"))
    page = app.test_client().get("/coverage/seed").data.decode()
    assert 'id="functions-hit"' in page and "Last sample finished" in page


@pytest.mark.slow
def test_a_uefi_build_s_bucket_is_crosschecked_on_real_firmware(
        farm: Farm, store: FarmStore) -> None:
    from kernel_emu import qemu

    if qemu.missing():
        pytest.skip(qemu.missing())
    app = make_app(Settings(redis_url=farm.url))
    sha = store.blobs.put((EXAMPLES / "vaddr-0x300028.elf").read_bytes())
    store.triage.pending([sha], "seed")
    farm.env["FUZZFARM_CROSSCHECK"] = "1"
    farm.worker("w1")  # as `fuzzfarm up` starts it: the crosscheck queue too, QEMU being here
    app.send_task("workers.tasks.triage_many", args=["seed", [sha]])

    def crosschecked() -> dict | None:
        (bucket,) = store.buckets.all() or [None]
        c = bucket.crosscheck if bucket else None
        return c if c and c["state"] not in ("queued",) else None

    c = wait_for(crosschecked, 240, "the bucket's crosscheck on QEMU + OVMF")
    assert isinstance(c, dict)
    (bucket,) = store.buckets.all()
    print(f"\ncrosscheck of the minimized input: {c}")
    assert c["state"] == "yes", c
    assert c["input"] == bucket.minimized  # the input a developer takes: the minimized one
    assert c["lines"] >= 10 and c["differences"] == []
    assert re.search(r"Task workers\.tasks\.crosscheck\[\S+\] succeeded", farm.log("w1"))
    assert store.stats.counters().get("harness_errors", 0) == 0
