"""Celery tasks: thin wrappers that call `workers.work` with ids only (never input bytes)."""

from __future__ import annotations

import contextlib
import logging
import socket
from functools import cache
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from workers import coverage, work
from workers.app import app
from workers.settings import Settings
from workers.store import FarmStore, StoreError

log = logging.getLogger("fuzzfarm.workers")


@cache
def _store() -> FarmStore:
    return FarmStore.connect(_settings().redis_url, "worker")


def _settings() -> Settings:
    return app.conf.fuzzfarm_settings


def _worker_name(task: Any) -> str:
    return str(getattr(task.request, "hostname", None) or socket.gethostname())


def send_triage(kernel: str, shas: list[str]) -> None:
    triage_many.delay(kernel, shas)


def send_minimize(buckets: list[str]) -> None:
    if buckets:
        minimize_many.delay(buckets)


def send_crosscheck(store: FarmStore, buckets: list[str], again: bool = False) -> int:
    """Queue a crosscheck of each bucket's current input (its queue is consumed only by
    workers that have QEMU + OVMF); one already queued or done for that input is not sent
    again unless `again`. Returns how many were sent."""
    sent = 0
    for bid in buckets:
        bucket = store.buckets.get(bid)
        if bucket is None:
            continue
        if store.buckets.queue_crosscheck(bid, bucket.minimized or bucket.reproducer, again):
            crosscheck.delay(bid)
            sent += 1
    return sent


@worker_ready.connect
def _announce(sender: Any = None, **_kwargs: Any) -> None:
    """A worker is listed as live from its start, not only from its first task."""
    name = str(getattr(sender, "hostname", None) or socket.gethostname())
    try:
        _store().stats.heartbeat(name, None)
    except Exception as e:  # noqa: BLE001 - a missed announcement only delays the listing
        log.warning("could not announce %s: %s", name, e)


@worker_shutting_down.connect
def _stop_running_slice(sender: Any = None, **_kwargs: Any) -> None:
    """SIGTERM (`docker stop`, the end of `fuzzfarm up`, systemd): Celery lets the running
    task finish; a fuzz slice is told to end its job now and report, so the worker stops
    within seconds instead of fuzzing on for the rest of its slice."""
    name = str(sender or socket.gethostname())
    try:
        _store().campaigns.stop_worker_slices(name)
    except Exception as e:  # noqa: BLE001 - without Redis the slice ends on its own time
        log.warning("could not tell the running slice of %s to stop: %s", name, e)


@app.task(bind=True, name="workers.tasks.fuzz_slice")
def fuzz_slice(self: Any, slice_id: str) -> dict[str, Any] | None:
    store = _store()
    store.stats.heartbeat(_worker_name(self), "fuzz", slice_id)
    try:
        return work.run_fuzz_slice(store, _settings(), slice_id, _worker_name(self),
                                   send_triage)
    except Exception as e:  # noqa: BLE001 - a failed slice is ours, never the kernel's
        work.harness_error_if_possible(store, f"fuzz slice {slice_id}",
                                       f"{type(e).__name__}: {e}")
        return None
    finally:
        with contextlib.suppress(StoreError):  # Redis away: the heartbeat goes stale alone
            store.stats.heartbeat(_worker_name(self), None)


@app.task(bind=True, name="workers.tasks.triage")
def triage(self: Any, sha: str, kernel: str) -> dict[str, Any]:
    """One input."""
    return _triage(self, kernel, [sha])[0]


@app.task(bind=True, name="workers.tasks.triage_many")
def triage_many(self: Any, kernel: str, shas: list[str]) -> list[dict[str, Any]]:
    """A slice's crashing inputs, one per signature: one task, so a few commands in all."""
    return _triage(self, kernel, shas)


def _triage(task: Any, kernel: str, shas: list[str]) -> list[dict[str, Any]]:
    store = _store()
    store.stats.heartbeat(_worker_name(task), "triage")
    taken: list[str] = []  # the inputs slices added while this task waited in the queue
    try:
        if not isinstance(shas, list) or not all(isinstance(s, str) for s in shas):
            raise TypeError(f"triage needs a list of input ids, got {type(shas).__name__}")
        taken = store.triage.starting(str(kernel))
        return work.triage_inputs(store, _settings(), str(kernel), [*shas, *taken],
                                  send_minimize)
    except Exception as e:  # noqa: BLE001
        work.record_harness_error(store, "triage", f"{type(e).__name__}: {e}")
        given = [str(s) for s in shas] if isinstance(shas, list) else []
        store.triage.done([*given, *taken], str(kernel))
        return [{"state": "harness-error"}]


@app.task(bind=True, name="workers.tasks.minimize")
def minimize(self: Any, bucket: str) -> dict[str, Any]:
    """One bucket (what the dashboard and `fuzzfarm minimize --bucket` send)."""
    return _minimize(self, [bucket])[0]


@app.task(bind=True, name="workers.tasks.minimize_many")
def minimize_many(self: Any, buckets: list[str]) -> list[dict[str, Any]]:
    """The buckets one triage task found new or smaller, one after the other."""
    return _minimize(self, buckets)


def _minimize(task: Any, buckets: list[str]) -> list[dict[str, Any]]:
    store = _store()
    store.stats.heartbeat(_worker_name(task), "minimize")
    if not isinstance(buckets, list):
        work.record_harness_error(store, "minimize", f"not a list of buckets: {buckets!r:.80}")
        return [{"state": "harness-error"}]
    out = []
    for bucket in buckets:
        try:
            out.append(work.minimize_bucket(store, _settings(), str(bucket)))
        except Exception as e:  # noqa: BLE001
            work.record_harness_error(store, "minimize", f"{type(e).__name__}: {e}")
            out.append({"state": "harness-error"})
    # the input a developer will take, minimized or not, checked on real firmware next
    if _settings().crosscheck:
        try:
            send_crosscheck(store, [str(b) for b, o in zip(buckets, out, strict=True)
                                    if o.get("state") not in ("unknown bucket",
                                                              "harness-error")])
        except Exception as e:  # noqa: BLE001 - the bucket stands; its crosscheck: "not run"
            work.record_harness_error(store, "crosscheck", f"could not queue: {e}")
    return out


@app.task(bind=True, name="workers.tasks.verify")
def verify(self: Any, bucket: str, kernel: str) -> dict[str, Any]:
    store = _store()
    try:
        return work.verify_bucket(store, _settings(), bucket, kernel)
    except Exception as e:  # noqa: BLE001
        work.record_harness_error(store, f"verify on {kernel}", f"{type(e).__name__}: {e}")
        return {"state": "harness-error"}


@app.task(bind=True, name="workers.tasks.crosscheck")
def crosscheck(self: Any, bucket: str) -> dict[str, Any]:
    """A bucket's input on QEMU + OVMF as well as in the emulator (queue `crosscheck`)."""
    store = _store()
    store.stats.heartbeat(_worker_name(self), "crosscheck")
    try:
        return work.crosscheck_bucket(store, _settings(), str(bucket))
    except Exception as e:  # noqa: BLE001 - ours, never the kernel's
        work.record_harness_error(store, "crosscheck", f"{type(e).__name__}: {e}")
        with contextlib.suppress(Exception):
            store.buckets.set_crosscheck(str(bucket), {"state": "harness-error",
                                                       "reason": f"{type(e).__name__}: {e}"})
        return {"state": "harness-error"}
    finally:
        with contextlib.suppress(StoreError):
            store.stats.heartbeat(_worker_name(self), None)


@app.task(bind=True, name="workers.tasks.sample_coverage")
def sample_coverage(self: Any, kernel: str, limit: Any) -> dict[str, Any]:
    """Sample a build's coverage for the dashboard (which claimed the build's job slot)."""
    store = _store()
    store.stats.heartbeat(_worker_name(self), "coverage")
    try:
        record = coverage.run_sample(store, _settings(), str(kernel), limit)
        return {"state": "done", "inputs": record["inputs"], "seconds": record["seconds"]}
    except Exception as e:  # noqa: BLE001 - the job slot says it failed; it is ours, not a find
        work.record_harness_error(store, f"coverage sample of {kernel!s:.64}",
                                  f"{type(e).__name__}: {e}")
        return {"state": "harness-error"}
    finally:
        store.stats.heartbeat(_worker_name(self), None)
