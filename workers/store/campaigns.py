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
    `slice_seconds`, `first_slice_seconds` (the length of the slices queued before any slice
    of the campaign finished, so its first findings reach triage soon; 0 or absent: the same
    as the others), `created`, `execs`, `edges` (max over slices), `slices_done`, `paused`
    (1: stopped by the farm's own shutdown, resumed by the next `fuzzfarm up`).
    Written by: creation; the `FINISH_SLICE` script adds each slice's counts once.
`ff:campaign:<id>:inflight` (set)
    Slice ids queued or running.
    Written by: the controller (adds), slices (remove when done).
`ff:slice:<id>` (hash)
    `id`, `campaign`, `kernel`, `seconds`, `state` (queued, running, done, lost, cancelled,
    unsent), `queued`, `started`, `seen` (its last progress report), `worker`, `finished`,
    `execs_reported` (execs already added to the campaign), `stats` (JSON: execs, edges,
    execs_per_second, new_inputs, findings, harness_errors, stop_reason). Every time is
    Redis's own clock (`TIME`), so machines whose clocks disagree judge a slice alike.
    Written by: the controller, the fuzz slice (claimed from `queued` to `running` in one
    script; progress every few seconds and the end by scripts that add to the campaign only
    what was not added before).
`ff:controller:wake` (list)
    At most a few ids, pushed when a slice finishes or a campaign is created or changed: the
    controller blocks on it (`BLPOP`, timeout half the lost-slice grace, at most 60 s)
    instead of polling.
    Written by: the `FINISH_SLICE` script, campaign changes.
`ff:campaign:<id>:state` (pub/sub channel)
    The campaign's new state, published when it changes: running slices stop at once
    without polling (they still read the state once a minute in case a message was lost).
    Written by: campaign changes.
`ff:worker:<node name>:stop` (pub/sub channel)
    Published when a worker begins to shut down: its running slice stops its job at once and
    reports what it did, instead of fuzzing on for the rest of its time.
    Written by: the worker (on SIGTERM, `docker stop`, the end of `fuzzfarm up`).

A campaign's time series (`ff:campaign:<id>:series`) is a statistic: `workers/store/stats.py`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from redis.client import PubSub

from workers.store.connection import Connection, decode, decode_hash, hashes, server_time

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


def worker_stop_channel(worker: str) -> str:
    return "ff:worker:" + worker + ":stop"


# the server's clock in seconds, inside a script
_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: slice hash, the campaign's in-flight set. ARGV: slice id, campaign id, kernel, seconds.
NEW_SLICE = _NOW + """
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'campaign', ARGV[2], 'kernel', ARGV[3],
           'seconds', ARGV[4], 'state', 'queued', 'queued', tostring(now))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: slice hash. ARGV: worker. Only a queued slice is started, once: a message delivered
# again (its worker died, or the visibility timeout passed) finds it running, lost or done.
CLAIM_SLICE = _NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'started', tostring(now),
           'seen', tostring(now))
return 1
"""

# KEYS: slice hash, campaign hash. ARGV: execs so far, edges so far.
# Adds to the campaign the execs not added yet; a slice declared lost that still reports is
# counted too (its work happened), a finished one not again.
SLICE_PROGRESS = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'lost' then return 0 end
local done = tonumber(redis.call('HGET', KEYS[1], 'execs_reported') or '0')
local execs = tonumber(ARGV[1])
if execs > done then
  redis.call('HINCRBY', KEYS[2], 'execs', execs - done)
  redis.call('HSET', KEYS[1], 'execs_reported', execs)
end
local edges = tonumber(redis.call('HGET', KEYS[2], 'edges') or '0')
if tonumber(ARGV[2]) > edges then redis.call('HSET', KEYS[2], 'edges', ARGV[2]) end
redis.call('HSET', KEYS[1], 'seen', tostring(now))
return 1
"""


# KEYS: slice hash, the campaign's in-flight set. ARGV: slice id, new state.
DROP_SLICE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'done' then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: slice hash, campaign hash, campaign's in-flight set, controller wake-up list.
# ARGV: slice id, stats json, execs, edges.
# A slice's statistics are added to its campaign once, however often it is reported (less
# what its progress reports added already); the controller is woken to send the next slice.
FINISH_SLICE = _NOW + """
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == 'done' then return 0 end
local done = tonumber(redis.call('HGET', KEYS[1], 'execs_reported') or '0')
redis.call('HSET', KEYS[1], 'state', 'done', 'finished', tostring(now), 'stats', ARGV[2],
           'execs_reported', math.max(done, tonumber(ARGV[3])))
if tonumber(ARGV[3]) > done then redis.call('HINCRBY', KEYS[2], 'execs', ARGV[3] - done) end
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
    paused: bool = False  # stopped by the farm's shutdown, to be resumed by the next start
    first_slice_seconds: float = 0.0  # 0: the first slices are as long as the others

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Campaign:
        return cls(h["id"], h.get("kernel", ""), h.get("state", ""), int(h.get("slices", 0)),
                   float(h.get("slice_seconds", 0)), float(h.get("created", 0)),
                   int(h.get("execs", 0)), int(h.get("edges", 0)),
                   int(h.get("slices_done", 0)), h.get("paused") == "1",
                   float(h.get("first_slice_seconds", 0)))

    def next_slice_seconds(self) -> float:
        """How long the next slice queued for this campaign runs: its first slices (those
        queued before any slice finished) are short when the campaign says so, so that the
        first findings are triaged within seconds of the start, not after a whole slice."""
        first = self.first_slice_seconds
        if self.slices_done == 0 and 0 < first < self.slice_seconds:
            return first
        return self.slice_seconds

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
    seen: float | None  # the last progress report (or the start)
    worker: str | None
    finished: float | None
    stats: dict[str, Any] | None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Slice:
        return cls(h["id"], h.get("campaign", ""), h.get("kernel", ""),
                   float(h.get("seconds", 0)), h.get("state", ""), _float(h.get("queued")),
                   _float(h.get("started")), _float(h.get("seen")), h.get("worker"),
                   _float(h.get("finished")),
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
        self._new_slice = conn.script(NEW_SLICE)
        self._claim = conn.script(CLAIM_SLICE)
        self._progress = conn.script(SLICE_PROGRESS)
        self._drop = conn.script(DROP_SLICE)

    # campaigns -------------------------------------------------------------------------------
    def create(self, kernel: str, slices: int, slice_seconds: float,
               first_slice_seconds: float = 0.0) -> str:
        """A running campaign; `first_slice_seconds` (if shorter than `slice_seconds`): the
        length of its first slices (:meth:`Campaign.next_slice_seconds`)."""
        cid = uuid.uuid4().hex[:12]
        with self._r.pipeline() as p:
            p.hset(campaign_key(cid), mapping={
                "id": cid, "kernel": kernel, "state": "running", "slices": slices,
                "slice_seconds": slice_seconds, "first_slice_seconds": first_slice_seconds,
                "created": time.time(), "execs": 0, "edges": 0, "slices_done": 0})
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

    def set_state(self, cid: str, state: str, *, paused: bool = False) -> None:
        """Change a campaign's state and tell its running slices and the controller at once.
        `paused`: stopped by the farm's own shutdown (`fuzzfarm up` resumes it next time),
        not by a user."""
        with self._r.pipeline() as p:
            p.hset(campaign_key(cid), mapping={"state": state, "paused": int(paused)})
            if state == "stopped":
                p.srem(ACTIVE, cid)
            else:
                p.sadd(ACTIVE, cid)
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

    def watch_state(self, cid: str, worker: str | None = None) -> StateWatch:
        """A subscription that receives the campaign's state changes as they happen, and, with
        `worker`, "stopping" when that worker begins to shut down."""
        sub = self._r.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(state_channel(cid), *([worker_stop_channel(worker)] if worker else []))
        return StateWatch(sub)

    def wait_for_wake(self, timeout: float) -> bool:
        """Block until a slice finishes or a campaign changes, or `timeout` seconds pass (one
        command either way); True if woken."""
        seconds = max(1, int(timeout))
        return self._conn.blocking(seconds).blpop([WAKE], timeout=seconds) is not None

    # slices ----------------------------------------------------------------------------------
    def new_slice(self, cid: str, kernel: str, seconds: float) -> str:
        sid = uuid.uuid4().hex[:12]
        self._new_slice(keys=[slice_key(sid), inflight_key(cid)], args=[sid, cid, kernel, seconds])
        return sid

    def slice(self, sid: str) -> Slice | None:
        h = decode_hash(self._r.hgetall(slice_key(sid)))
        return Slice.from_hash(h) if h else None

    def slices(self, sids: list[str]) -> list[Slice]:
        """Those of `sids` that exist, in one round trip."""
        return [Slice.from_hash(h) for h in hashes(self._r, [slice_key(s) for s in sids])]

    def claim_slice(self, sid: str, worker: str) -> bool:
        """Start a queued slice on `worker`, in one step; False if it is not queued (a message
        delivered again after its worker died or after it finished: the controller replaces
        a slice that was lost)."""
        return bool(self._claim(keys=[slice_key(sid)], args=[worker]))

    def slice_progress(self, sid: str, cid: str, execs: int, edges: int) -> bool:
        """A running slice's counts so far: the campaign gets the execs not yet added, the
        slice is seen now (by Redis's clock). False once the slice has finished."""
        return bool(self._progress(keys=[slice_key(sid), campaign_key(cid)],
                                   args=[int(execs), int(edges)]))

    def finish_slice(self, sid: str, cid: str, stats: dict[str, Any]) -> bool:
        """Record a slice's statistics and add them to its campaign, once (less what its
        progress reports added); False if it was already recorded."""
        done = self._finish(keys=[slice_key(sid), campaign_key(cid), inflight_key(cid), WAKE],
                            args=[sid, json.dumps(stats), int(stats.get("execs", 0)),
                                  int(stats.get("edges", 0))])
        return bool(done)

    def drop_slice(self, sid: str, cid: str, state: str) -> None:
        """Take a slice out of its campaign's flight as lost, cancelled or unsent (a slice
        that has finished meanwhile stays done)."""
        self._drop(keys=[slice_key(sid), inflight_key(cid)], args=[sid, state])

    def server_time(self) -> float:
        """Redis's clock, in seconds: what slice times are written in."""
        return server_time(self._r)

    def stop_worker_slices(self, worker: str) -> None:
        """Tell the slice running on `worker` (a node name) to stop now and report."""
        self._r.publish(worker_stop_channel(worker), "stopping")

    def inflight(self, cid: str) -> list[str]:
        return sorted(decode(s) for s in self._r.smembers(inflight_key(cid)))
