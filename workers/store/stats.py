"""How the farm is doing: counters, the workers' heartbeats, the farm's own failures (harness
errors, never findings) and each campaign's time series.

Schema
------
`ff:counters` (hash)
    `harness_errors`, `slices_lost`, `triage_resent`, `triage_ok`, `triage_rejected`.
    Written by: workers, the controller.
`ff:harness-errors` (list)
    JSON `{where, error, input, time}`, newest first, 50 kept: the farm's own failures,
    never findings.
    Written by: workers.
`ff:workers` (hash)
    Worker node name → JSON `{task, slice, seen}` heartbeat.
    Written by: tasks.
`ff:campaign:<id>:series` (list)
    JSON points `{t, execs, execs_per_second, edges, corpus, buckets, workers}`, newest
    last, the last 2,000 kept.
    Written by: the controller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from workers.store.connection import Connection, decode_hash

COUNTERS = "ff:counters"
HARNESS_ERRORS = "ff:harness-errors"
WORKERS = "ff:workers"
ERRORS_KEPT = 50
SERIES_KEPT = 2000
SERIES_SLACK = 100  # trimmed once per this many points, not at every point


def series_key(cid: str) -> str:
    return "ff:campaign:" + cid + ":series"


@dataclass(frozen=True)
class HarnessErrorRecord:
    """One failure of the farm itself."""

    where: str
    error: str
    input: str | None  # sha256 of the input it happened on
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "error": self.error, "input": self.input,
                "time": self.time}


@dataclass(frozen=True)
class Heartbeat:
    task: str | None  # fuzz, triage, minimize, coverage; None when idle
    slice: str | None
    seen: float

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "slice": self.slice, "seen": self.seen}


class Stats:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    # counters ----------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self._r.hincrby(COUNTERS, name, n)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in decode_hash(self._r.hgetall(COUNTERS)).items()}

    # harness errors ------------------------------------------------------------------------
    def record_harness_error(self, where: str, error: str,
                             sha: str | None = None) -> HarnessErrorRecord:
        entry = HarnessErrorRecord(where, error, sha, time.time())
        with self._r.pipeline() as p:
            p.hincrby(COUNTERS, "harness_errors", 1)
            p.lpush(HARNESS_ERRORS, json.dumps(entry.to_json()))
            p.ltrim(HARNESS_ERRORS, 0, ERRORS_KEPT - 1)
            p.execute()
        return entry

    def harness_errors(self, n: int = ERRORS_KEPT) -> list[HarnessErrorRecord]:
        """The newest `n`, newest first."""
        out = []
        for raw in self._r.lrange(HARNESS_ERRORS, 0, n - 1):
            try:
                e = json.loads(raw)
                out.append(HarnessErrorRecord(str(e.get("where", "")), str(e.get("error", "")),
                                              e.get("input"), float(e.get("time", 0))))
            except (ValueError, TypeError, AttributeError):
                continue
        return out

    # heartbeats ----------------------------------------------------------------------------
    def heartbeat(self, worker: str, task: str | None, slice_id: str | None = None) -> None:
        beat: dict[str, Any] = {"task": task}
        if slice_id is not None:
            beat["slice"] = slice_id
        beat["seen"] = time.time()
        self._r.hset(WORKERS, worker, json.dumps(beat))

    def forget_worker(self, worker: str) -> None:
        self._r.hdel(WORKERS, worker)

    def workers(self, max_age: float = 120.0) -> dict[str, Heartbeat]:
        """Workers with a heartbeat in the last `max_age` seconds."""
        now = time.time()
        out = {}
        for name, raw in decode_hash(self._r.hgetall(WORKERS)).items():
            info = json.loads(raw)
            seen = float(info.get("seen", 0))
            if now - seen <= max_age:
                out[name] = Heartbeat(info.get("task"), info.get("slice"), seen)
        return out

    # time series ---------------------------------------------------------------------------
    def add_series_point(self, cid: str, point: dict[str, Any]) -> None:
        key = series_key(cid)
        if self._r.rpush(key, json.dumps(point)) > SERIES_KEPT + SERIES_SLACK:
            self._r.ltrim(key, -SERIES_KEPT, -1)

    def series(self, cid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self._r.lrange(series_key(cid), 0, -1)]

    def latest_point(self, cid: str) -> dict[str, Any]:
        """The newest point of a campaign's series ({} before the first)."""
        raw = self._r.lindex(series_key(cid), -1)
        return json.loads(raw) if raw else {}
