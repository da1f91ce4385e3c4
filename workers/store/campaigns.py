"""Campaigns and their fuzz slices: what the controller keeps in flight and the slices report.

Schema
------
`ff:campaigns` (zset)
    Campaign id → creation time.
    Written by: `campaign start`, `up`, the controller (`FUZZFARM_CAMPAIGN`).
`ff:campaigns:active` (set)
    Ids of the campaigns running or stopping: what the controller looks after.
    Written by: campaign creation (adds), a change to `stopped` (removes).
`ff:campaign:<id>` (hash)
    `id`, `kernel`, `state` (running, stopping, stopped), `slices` (in flight),
    `slice_seconds`, `created`, `execs`, `edges` (max over slices), `slices_done`.
    Written by: creation; the `FINISH_SLICE` script adds each slice's counts once.
`ff:campaign:<id>:inflight` (set)
    Slice ids queued or running.
    Written by: the controller (adds), slices (remove when done).
`ff:slice:<id>` (hash)
    `id`, `campaign`, `kernel`, `seconds`, `state` (queued, running, done, lost, cancelled,
    unsent), `queued`, `started`, `worker`, `finished`, `stats` (JSON: execs, edges,
    execs_per_second, new_inputs, findings, harness_errors, stop_reason).
    Written by: the controller, the fuzz slice.
`ff:controller:wake` (list)
    At most a few ids, pushed when a slice finishes or a campaign is created or changed: the
    controller blocks on it (`BLPOP`, timeout half the lost-slice grace, at most 60 s)
    instead of polling.
    Written by: the `FINISH_SLICE` script, campaign changes.
`ff:campaign:<id>:state` (pub/sub channel)
    The campaign's new state, published when it changes: running slices stop at once
    without polling (they still read the state once a minute in case a message was lost).
    Written by: campaign changes.

A campaign's time series (`ff:campaign:<id>:series`) is a statistic: `workers/store/stats.py`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from redis.client import PubSub

from workers.store.connection import Connection, decode, decode_hash, hashes

CAMPAIGNS = "ff:campaigns"
ACTIVE = "ff:campaigns:active"
WAKE = "ff:controller:wake"


def campaign_key(cid: str) -> str:
    return "ff:campaign:" + cid


def inflight_key(cid: str) -> str:
    return "ff:campaign:" + cid + ":inflight"


def state_channel(cid: str) -> str:
    return "ff:campaign:" + cid + ":state"


def slice_key(sid: str) -> str:
    return "ff:slice:" + sid


# KEYS: slice hash, campaign hash, campaign's in-flight set, controller wake-up list.
# ARGV: slice id, stats json, execs, edges, now.
# A slice's statistics are added to its campaign once, however often it is reported; the
# controller is woken to send the next slice at once.
FINISH_SLICE = """
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == 'done' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[5], 'stats', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'execs', ARGV[3])
local edges = tonumber(redis.call('HGET', KEYS[2], 'edges') or '0')
if tonumber(ARGV[4]) > edges then redis.call('HSET', KEYS[2], 'edges', ARGV[4]) end
redis.call('HINCRBY', KEYS[2], 'slices_done', 1)
if redis.call('LPUSH', KEYS[4], ARGV[1]) > 1 then redis.call('LTRIM', KEYS[4], 0, 0) end
return 1
"""


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


@dataclass(frozen=True)
class Campaign:
    id: str
    kernel: str
    state: str  # running, stopping, stopped
    slices: int  # kept in flight
    slice_seconds: float
    created: float
    execs: int
    edges: int
    slices_done: int

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Campaign:
        return cls(h["id"], h.get("kernel", ""), h.get("state", ""), int(h.get("slices", 0)),
                   float(h.get("slice_seconds", 0)), float(h.get("created", 0)),
                   int(h.get("execs", 0)), int(h.get("edges", 0)),
                   int(h.get("slices_done", 0)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Slice:
    id: str
    campaign: str
    kernel: str
    seconds: float
    state: str  # queued, running, done, lost, cancelled, unsent
    queued: float | None
    started: float | None
    worker: str | None
    finished: float | None
    stats: dict[str, Any] | None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Slice:
        return cls(h["id"], h.get("campaign", ""), h.get("kernel", ""),
                   float(h.get("seconds", 0)), h.get("state", ""), _float(h.get("queued")),
                   _float(h.get("started")), h.get("worker"), _float(h.get("finished")),
                   json.loads(h["stats"]) if h.get("stats") else None)


class StateWatch:
    """A campaign's state changes as they are published: waiting for one costs no command."""

    def __init__(self, sub: PubSub) -> None:
        self._sub = sub

    def next_state(self, timeout: float) -> str | None:
        """The new state, or None if none came within `timeout` seconds."""
        message = self._sub.get_message(timeout=timeout)
        if message is not None and message.get("type") == "message":
            return decode(message.get("data"))
        return None

    def close(self) -> None:
        self._sub.close()


class Campaigns:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._r = conn.client
        self._finish = conn.script(FINISH_SLICE)

    # campaigns -------------------------------------------------------------------------------
    def create(self, kernel: str, slices: int, slice_seconds: float) -> str:
        cid = uuid.uuid4().hex[:12]
        with self._r.pipeline() as p:
            p.hset(campaign_key(cid), mapping={
                "id": cid, "kernel": kernel, "state": "running", "slices": slices,
                "slice_seconds": slice_seconds, "created": time.time(), "execs": 0,
                "edges": 0, "slices_done": 0})
            p.zadd(CAMPAIGNS, {cid: time.time()})
            p.sadd(ACTIVE, cid)
            p.lpush(WAKE, cid)
            p.execute()
        return cid

    def get(self, cid: str) -> Campaign | None:
        h = decode_hash(self._r.hgetall(campaign_key(cid)))
        return Campaign.from_hash(h) if h else None

    def _many(self, ids: list[str]) -> list[Campaign]:
        return [Campaign.from_hash(h) for h in hashes(self._r, [campaign_key(c) for c in ids])]

    def all(self) -> list[Campaign]:
        """Every campaign, oldest first."""
        return self._many([decode(c) for c in self._r.zrange(CAMPAIGNS, 0, -1)])

    def active(self) -> list[Campaign]:
        """Campaigns running or stopping (what the controller looks after)."""
        return self._many(sorted(decode(c) for c in self._r.smembers(ACTIVE)))

    def set_state(self, cid: str, state: str) -> None:
        """Change a campaign's state and tell its running slices and the controller at once."""
        with self._r.pipeline() as p:
            p.hset(campaign_key(cid), "state", state)
            if state == "stopped":
                p.srem(ACTIVE, cid)
            p.publish(state_channel(cid), state)
            p.lpush(WAKE, cid)
            p.execute()

    def set_slices(self, cid: str, slices: int) -> None:
        with self._r.pipeline() as p:
            p.hset(campaign_key(cid), "slices", slices)
            p.lpush(WAKE, cid)
            p.execute()

    def state(self, cid: str) -> str | None:
        state = self._r.hget(campaign_key(cid), "state")
        return decode(state) if state is not None else None

    def watch_state(self, cid: str) -> StateWatch:
        """A subscription that receives the campaign's state changes as they happen."""
        sub = self._r.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(state_channel(cid))
        return StateWatch(sub)

    def wait_for_wake(self, timeout: float) -> bool:
        """Block until a slice finishes or a campaign changes, or `timeout` seconds pass (one
        command either way); True if woken."""
        seconds = max(1, int(timeout))
        return self._conn.blocking(seconds).blpop([WAKE], timeout=seconds) is not None

    # slices ----------------------------------------------------------------------------------
    def new_slice(self, cid: str, kernel: str, seconds: float) -> str:
        sid = uuid.uuid4().hex[:12]
        # no MULTI: a slice hash left without its in-flight entry by a crash is never run
        with self._r.pipeline(transaction=False) as p:
            p.hset(slice_key(sid), mapping={
                "id": sid, "campaign": cid, "kernel": kernel, "seconds": seconds,
                "state": "queued", "queued": time.time()})
            p.sadd(inflight_key(cid), sid)
            p.execute()
        return sid

    def slice(self, sid: str) -> Slice | None:
        h = decode_hash(self._r.hgetall(slice_key(sid)))
        return Slice.from_hash(h) if h else None

    def slices(self, sids: list[str]) -> list[Slice]:
        """Those of `sids` that exist, in one round trip."""
        return [Slice.from_hash(h) for h in hashes(self._r, [slice_key(s) for s in sids])]

    def start_slice(self, sid: str, worker: str) -> bool:
        """Mark a slice running; False if it already finished (a redelivered message)."""
        key = slice_key(sid)
        if decode(self._r.hget(key, "state") or b"") == "done":
            return False
        self._r.hset(key, mapping={"state": "running", "worker": worker,
                                   "started": time.time()})
        return True

    def finish_slice(self, sid: str, cid: str, stats: dict[str, Any]) -> bool:
        """Record a slice's statistics and add them to its campaign, once; False if it was
        already recorded."""
        done = self._finish(keys=[slice_key(sid), campaign_key(cid), inflight_key(cid), WAKE],
                            args=[sid, json.dumps(stats), int(stats.get("execs", 0)),
                                  int(stats.get("edges", 0)), time.time()])
        return bool(done)

    def drop_slice(self, sid: str, cid: str, state: str) -> None:
        """Take a slice out of its campaign's flight as lost, cancelled or unsent."""
        with self._r.pipeline() as p:
            p.hset(slice_key(sid), "state", state)
            p.srem(inflight_key(cid), sid)
            p.execute()

    def inflight(self, cid: str) -> list[str]:
        return sorted(decode(s) for s in self._r.smembers(inflight_key(cid)))
