"""Everything the farm keeps in Redis, and the only code that writes it (see SCHEMA.md).

Bytes (inputs, kernel images) are stored once, by sha256; everything else refers to them by
that id. Multi-key updates run as Lua scripts or MULTI/EXEC, so a worker killed midway leaves
either the old state or the new one, and every update is idempotent: doing it twice (a task
delivered again after a crash) changes nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

P = "ff:"
SAMPLES_KEPT = 5
SERIES_KEPT = 2000
WAKE = P + "controller:wake"
SERIES_SLACK = 100  # trimmed once per this many points, not at every point


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_channel(cid: str) -> str:
    return P + "campaign:" + cid + ":state"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


# KEYS: bucket hash, bucket inputs set, bucket samples list, buckets zset, sizes hash
# ARGV: bucket id, signature, class, kernel, input sha, input size, now, sample json,
#       index of the last sample kept
# Returns {new bucket, reproducer shrank, minimize it}: minimization is asked for a new
# bucket, and for a smaller reproducer only if it is smaller than the minimized one too and
# no minimization is queued already (`minimize_queued`, cleared when one ends).
UPSERT_BUCKET = """
if redis.call('SADD', KEYS[2], ARGV[5]) == 0 then
  return {0, 0, 0}
end
local size = tonumber(ARGV[6])
local cur = redis.call('HMGET', KEYS[1], 'reproducer_size', 'minimized_size', 'minimize_queued')
local new, shrank, minimize = 0, 0, 0
if not cur[1] then
  new, minimize = 1, 1
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'signature', ARGV[2], 'class', ARGV[3],
             'kernel', ARGV[4], 'first_seen', ARGV[7], 'last_seen', ARGV[7], 'count', 1,
             'reproducer', ARGV[5], 'reproducer_size', ARGV[6], 'minimize_queued', ARGV[7])
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[6])
else
  redis.call('HINCRBY', KEYS[1], 'count', 1)
  if size < tonumber(cur[1]) then
    shrank = 1
    local below_minimized = (not cur[2]) or size < tonumber(cur[2])
    if below_minimized and not cur[3] then minimize = 1 end
    if minimize == 1 then
      redis.call('HSET', KEYS[1], 'last_seen', ARGV[7], 'reproducer', ARGV[5],
                 'reproducer_size', ARGV[6], 'minimize_queued', ARGV[7])
    else
      redis.call('HSET', KEYS[1], 'last_seen', ARGV[7], 'reproducer', ARGV[5],
                 'reproducer_size', ARGV[6])
    end
    if below_minimized then redis.call('HSET', KEYS[5], ARGV[1], ARGV[6]) end
  else
    redis.call('HSET', KEYS[1], 'last_seen', ARGV[7])
  end
end
if redis.call('LPUSH', KEYS[3], ARGV[8]) > tonumber(ARGV[9]) + 1 then
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[9]))
end
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
return {new, shrank, minimize}
"""

# KEYS: bucket hash, sizes hash. ARGV: bucket id, minimized sha, size, now.
# Keeps the smallest minimized input and marks the minimization done; the sizes hash then
# holds the smallest known input, so slices stop sending bigger ones.
SET_MINIMIZED = """
local cur = redis.call('HMGET', KEYS[1], 'id', 'minimized_size', 'reproducer_size')
if not cur[1] then return 0 end
local size = tonumber(ARGV[3])
local stored = 0
if (not cur[2]) or size < tonumber(cur[2]) then
  redis.call('HSET', KEYS[1], 'minimized', ARGV[2], 'minimized_size', ARGV[3],
             'minimize_done', ARGV[4])
  local smallest = size
  if cur[3] and tonumber(cur[3]) < smallest then smallest = tonumber(cur[3]) end
  redis.call('HSET', KEYS[2], ARGV[1], smallest)
  stored = 1
else
  redis.call('HSET', KEYS[1], 'minimize_done', ARGV[4])
end
redis.call('HDEL', KEYS[1], 'minimize_queued')
return stored
"""

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


# KEYS: bucket hash. ARGV: now.
MINIMIZE_DONE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'minimize_done', ARGV[1])
  redis.call('HDEL', KEYS[1], 'minimize_queued')
end
return 0
"""


class Upsert(NamedTuple):
    new: bool  # the bucket did not exist
    shrank: bool  # this input is the bucket's smallest reproducer now
    minimize: bool  # a minimization is worth queueing


@dataclass
class Bucket:
    id: str
    signature: str
    crash_class: str
    kernel: str
    count: int
    first_seen: float
    last_seen: float
    reproducer: str
    reproducer_size: int
    minimized: str | None
    minimized_size: int | None
    verify: dict[str, dict[str, Any]]

    @classmethod
    def from_hash(cls, h: dict[str, str], seen: Any = None) -> Bucket:
        """`seen`: when a slice last hit the bucket without sending the input to triage."""
        verify = {k.split(":", 1)[1]: json.loads(v) for k, v in h.items()
                  if k.startswith("verify:")}
        last = max(float(h.get("last_seen", 0)), float(_s(seen)) if seen else 0.0)
        return cls(h["id"], h["signature"], h["class"], h["kernel"], int(h.get("count", 0)),
                   float(h.get("first_seen", 0)), last,
                   h.get("reproducer", ""), int(h.get("reproducer_size", 0)),
                   h.get("minimized"), int(h["minimized_size"]) if "minimized_size" in h
                   else None, verify)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "signature": self.signature, "class": self.crash_class,
                "kernel": self.kernel, "count": self.count, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "reproducer": self.reproducer,
                "reproducer_size": self.reproducer_size, "minimized": self.minimized,
                "minimized_size": self.minimized_size, "verify": self.verify}


class FarmStore:
    """Typed access to the farm's Redis keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._blocking: redis.Redis | None = None
        self._upsert = client.register_script(UPSERT_BUCKET)
        self._set_min = client.register_script(SET_MINIMIZED)
        self._finish = client.register_script(FINISH_SLICE)
        self._min_done = client.register_script(MINIMIZE_DONE)

    @classmethod
    def connect(cls, url: str) -> FarmStore:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5,
                                        retry_on_timeout=True, health_check_interval=30))

    # bytes by sha256 ----------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        sha = sha256(data)
        self.r.set(P + "blob:" + sha, data, nx=True)
        return sha

    def put_blobs(self, inputs: list[bytes]) -> list[str]:
        """Store several inputs in one command (a blob's bytes are its name, so writing one
        that exists changes nothing)."""
        shas = [sha256(d) for d in inputs]
        if shas:
            self.r.mset({P + "blob:" + sha: data for sha, data in zip(shas, inputs, strict=True)})
        return shas

    def get_blob(self, sha: str) -> bytes | None:
        return self.r.get(P + "blob:" + sha)

    def get_blobs(self, shas: list[str]) -> list[bytes | None]:
        return self.r.mget([P + "blob:" + s for s in shas]) if shas else []

    # kernels -------------------------------------------------------------------------------
    def put_kernel(self, name: str, profile_toml: str, image_sha: str, description: str) -> None:
        with self.r.pipeline() as p:
            p.hset(P + "kernel:" + name, mapping={
                "name": name, "profile": profile_toml, "image": image_sha,
                "description": description, "added": time.time()})
            p.sadd(P + "kernels", name)
            p.execute()

    def get_kernel(self, name: str) -> dict[str, str] | None:
        h = _hash(self.r.hgetall(P + "kernel:" + name))
        return h or None

    def kernels(self) -> list[str]:
        return sorted(_s(k) for k in self.r.smembers(P + "kernels"))

    # corpus (per kernel build): a sorted set of input shas scored by when they were added --
    def corpus_sample(self, kernel: str, recent: int, sampled: int) -> set[str]:
        """The `recent` newest inputs plus up to `sampled` others picked at random."""
        key = P + "corpus:" + kernel
        with self.r.pipeline(transaction=False) as p:
            p.zrevrange(key, 0, recent - 1)
            # as many as both parts: enough left to pick `sampled` outside the newest
            p.zrandmember(key, recent + sampled)
            newest, random_ones = p.execute()
        chosen = {_s(m) for m in newest}
        others = [m for m in dict.fromkeys(_s(m) for m in random_ones or []) if m not in chosen]
        return chosen | set(others[:sampled])

    def corpus_add(self, kernel: str, inputs: list[bytes]) -> int:
        """Add inputs to the shared corpus in three commands, whatever their number."""
        if not inputs:
            return 0
        by_sha = {sha256(d): d for d in inputs}
        key = P + "corpus:" + kernel
        scores = self.r.zmscore(key, list(by_sha))
        new = {sha: by_sha[sha] for sha, score in zip(by_sha, scores, strict=True)
               if score is None}
        if not new:
            return 0
        # no MULTI: the blobs go first, so the corpus never names a missing one, and a blob
        # left without its corpus entry by a crash in between is harmless
        with self.r.pipeline(transaction=False) as p:
            # content-addressed: overwriting a blob writes the same bytes
            p.mset({P + "blob:" + sha: data for sha, data in new.items()})
            p.zadd(key, dict.fromkeys(new, time.time()), nx=True)
            return int(p.execute()[-1])

    def reproducer_sizes(self, bucket_ids: list[str]) -> dict[str, int | None]:
        """The size of the smallest known input of each bucket, the minimized one included
        (None: no such bucket), in one command."""
        if not bucket_ids:
            return {}
        sizes = self.r.hmget(P + "bucket-sizes", bucket_ids)
        return {b: int(v) if v is not None else None
                for b, v in zip(bucket_ids, sizes, strict=True)}

    def corpus_size(self, kernel: str) -> int:
        return int(self.r.zcard(P + "corpus:" + kernel))

    # campaigns and slices -----------------------------------------------------------------
    def create_campaign(self, kernel: str, slices: int, slice_seconds: float) -> str:
        cid = uuid.uuid4().hex[:12]
        with self.r.pipeline() as p:
            p.hset(P + "campaign:" + cid, mapping={
                "id": cid, "kernel": kernel, "state": "running", "slices": slices,
                "slice_seconds": slice_seconds, "created": time.time(), "execs": 0,
                "edges": 0, "slices_done": 0})
            p.zadd(P + "campaigns", {cid: time.time()})
            p.sadd(P + "campaigns:active", cid)
            p.lpush(WAKE, cid)
            p.execute()
        return cid

    def campaign(self, cid: str) -> dict[str, str] | None:
        return _hash(self.r.hgetall(P + "campaign:" + cid)) or None

    def campaigns(self) -> list[dict[str, str]]:
        ids = [_s(c) for c in self.r.zrange(P + "campaigns", 0, -1)]
        return [c for c in (self.campaign(i) for i in ids) if c]

    def active_campaigns(self) -> list[dict[str, str]]:
        """Campaigns running or stopping (what the controller looks after)."""
        ids = sorted(_s(c) for c in self.r.smembers(P + "campaigns:active"))
        return [c for c in (self.campaign(i) for i in ids) if c]

    def set_campaign_state(self, cid: str, state: str) -> None:
        """Change a campaign's state and tell its running slices and the controller at once."""
        with self.r.pipeline() as p:
            p.hset(P + "campaign:" + cid, "state", state)
            if state == "stopped":
                p.srem(P + "campaigns:active", cid)
            p.publish(state_channel(cid), state)
            p.lpush(WAKE, cid)
            p.execute()

    def set_campaign_slices(self, cid: str, slices: int) -> None:
        with self.r.pipeline() as p:
            p.hset(P + "campaign:" + cid, "slices", slices)
            p.lpush(WAKE, cid)
            p.execute()

    def watch_campaign_state(self, cid: str) -> redis.client.PubSub:
        """A subscription that receives the campaign's state changes as they happen (no
        polling: messages cost no commands)."""
        sub = self.r.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(state_channel(cid))
        return sub

    def campaign_state(self, cid: str) -> str | None:
        state = self.r.hget(P + "campaign:" + cid, "state")
        return _s(state) if state is not None else None

    def new_slice(self, cid: str, kernel: str, seconds: float) -> str:
        sid = uuid.uuid4().hex[:12]
        # no MULTI: a slice hash left without its in-flight entry by a crash is never run
        with self.r.pipeline(transaction=False) as p:
            p.hset(P + "slice:" + sid, mapping={
                "id": sid, "campaign": cid, "kernel": kernel, "seconds": seconds,
                "state": "queued", "queued": time.time()})
            p.sadd(P + "campaign:" + cid + ":inflight", sid)
            p.execute()
        return sid

    def slice(self, sid: str) -> dict[str, str] | None:
        return _hash(self.r.hgetall(P + "slice:" + sid)) or None

    def start_slice(self, sid: str, worker: str) -> bool:
        """Mark a slice running; False if it already finished (a redelivered message)."""
        key = P + "slice:" + sid
        if _s(self.r.hget(key, "state") or b"") == "done":
            return False
        self.r.hset(key, mapping={"state": "running", "worker": worker, "started": time.time()})
        return True

    def finish_slice(self, sid: str, cid: str, stats: dict[str, Any]) -> bool:
        done = self._finish(keys=[P + "slice:" + sid, P + "campaign:" + cid,
                                  P + "campaign:" + cid + ":inflight", WAKE],
                            args=[sid, json.dumps(stats), int(stats.get("execs", 0)),
                                  int(stats.get("edges", 0)), time.time()])
        return bool(done)

    def wait_for_wake(self, timeout: float) -> bool:
        """Block until a slice finishes or `timeout` seconds pass (one command either way);
        True if woken."""
        seconds = max(1, int(timeout))
        if self._blocking is None:
            # a connection of its own, whose socket timeout outlasts the wait
            pool = self.r.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": seconds + 15}
            self._blocking = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **kwargs))
        return self._blocking.blpop([WAKE], timeout=seconds) is not None

    def drop_slice(self, sid: str, cid: str, state: str) -> None:
        with self.r.pipeline() as p:
            p.hset(P + "slice:" + sid, "state", state)
            p.srem(P + "campaign:" + cid + ":inflight", sid)
            p.execute()

    def inflight(self, cid: str) -> list[str]:
        return sorted(_s(s) for s in self.r.smembers(P + "campaign:" + cid + ":inflight"))

    def add_series_point(self, cid: str, point: dict[str, Any]) -> None:
        key = P + "campaign:" + cid + ":series"
        if self.r.rpush(key, json.dumps(point)) > SERIES_KEPT + SERIES_SLACK:
            self.r.ltrim(key, -SERIES_KEPT, -1)

    def series(self, cid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(P + "campaign:" + cid + ":series", 0, -1)]

    # triage work not yet done (so nothing is lost when a worker dies) ----------------------
    def pending_triage(self, sha: str, kernel: str) -> None:
        self.pending_triage_many([sha], kernel)

    def pending_triage_many(self, shas: list[str], kernel: str) -> None:
        if shas:
            now = time.time()
            self.r.zadd(P + "triage:pending", {f"{kernel}:{sha}": now for sha in shas}, nx=True)

    def triage_done(self, sha: str, kernel: str) -> None:
        self.triage_done_many([sha], kernel)

    def triage_done_many(self, shas: list[str], kernel: str) -> None:
        if shas:
            self.r.zrem(P + "triage:pending", *[f"{kernel}:{sha}" for sha in shas])

    def stale_triage(self, older_than: float) -> list[tuple[str, str]]:
        items = self.r.zrangebyscore(P + "triage:pending", 0, time.time() - older_than)
        out = []
        for item in items:
            kernel, sha = _s(item).rsplit(":", 1)
            out.append((sha, kernel))
        return out

    def triage_backlog(self) -> int:
        return int(self.r.zcard(P + "triage:pending"))

    def touch_triage(self, items: list[tuple[str, str]]) -> None:
        """Restart the grace period of (sha, kernel) entries that are being sent again."""
        if items:
            now = time.time()
            self.r.zadd(P + "triage:pending", {f"{kernel}:{sha}": now for sha, kernel in items},
                        xx=True)

    # buckets -------------------------------------------------------------------------------
    def upsert_bucket(self, bucket_id: str, signature: str, crash_class: str, kernel: str,
                      sha: str, size: int, sample: dict[str, Any]) -> Upsert:
        """Count one crashing input in its bucket. An input already counted changes
        nothing."""
        key = P + "bucket:" + bucket_id
        new, shrank, minimize = self._upsert(
            keys=[key, key + ":inputs", key + ":samples", P + "buckets",
                  P + "bucket-sizes"],
            args=[bucket_id, signature, crash_class, kernel, sha, size, time.time(),
                  json.dumps(sample), SAMPLES_KEPT - 1])
        return Upsert(bool(new), bool(shrank), bool(minimize))

    def mark_seen(self, bucket_ids: list[str]) -> None:
        """Known buckets a slice hit again (it sends only new or smaller inputs to triage):
        their last-seen time, all in one command."""
        if bucket_ids:
            now = time.time()
            self.r.hset(P + "bucket-seen", mapping=dict.fromkeys(bucket_ids, now))

    def bucket(self, bucket_id: str) -> Bucket | None:
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(P + "bucket:" + bucket_id)
            p.hget(P + "bucket-seen", bucket_id)
            raw, seen = p.execute()
        return Bucket.from_hash(_hash(raw), seen) if raw else None

    def buckets(self) -> list[Bucket]:
        ids = [_s(b) for b in self.r.zrevrange(P + "buckets", 0, -1)]
        if not ids:
            return []
        with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(P + "bucket:" + i)
            p.hmget(P + "bucket-seen", ids)
            *raws, seen = p.execute()
        return [Bucket.from_hash(_hash(raw), t) for raw, t in zip(raws, seen, strict=True)
                if raw]

    def bucket_count(self) -> int:
        return int(self.r.zcard(P + "buckets"))

    def bucket_samples(self, bucket_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(P + "bucket:" + bucket_id + ":samples",
                                                     0, -1)]

    def set_minimized(self, bucket_id: str, sha: str, size: int) -> bool:
        """Record a minimized input (kept if the smallest so far) and that the minimization
        ended; False if it was not the smallest."""
        return bool(self._set_min(keys=[P + "bucket:" + bucket_id, P + "bucket-sizes"],
                                  args=[bucket_id, sha, size, time.time()]))

    def mark_minimize_done(self, bucket_id: str) -> None:
        self._min_done(keys=[P + "bucket:" + bucket_id], args=[time.time()])

    def set_verify(self, bucket_id: str, kernel: str, state: dict[str, Any]) -> None:
        self.r.hset(P + "bucket:" + bucket_id, "verify:" + kernel, json.dumps(state))

    # reports (a Result JSON per input and kernel) ------------------------------------------
    def put_input_and_report(self, data: bytes, kernel: str, report: dict[str, Any]) -> str:
        """An input and its report in one command; returns the input's sha256."""
        sha = sha256(data)
        self.r.mset({P + "blob:" + sha: data,
                     P + "report:" + kernel + ":" + sha: json.dumps(report)})
        return sha

    def put_report(self, sha: str, kernel: str, report: dict[str, Any]) -> None:
        self.put_reports(kernel, {sha: report})

    def put_reports(self, kernel: str, reports: dict[str, dict[str, Any]]) -> None:
        if reports:
            self.r.mset({P + "report:" + kernel + ":" + sha: json.dumps(report)
                         for sha, report in reports.items()})

    def report(self, sha: str, kernel: str) -> dict[str, Any] | None:
        raw = self.r.get(P + "report:" + kernel + ":" + sha)
        return json.loads(raw) if raw else None

    # counters and health --------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(P + "counters", name, n)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in _hash(self.r.hgetall(P + "counters")).items()}

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        self.r.hset(P + "workers", worker, json.dumps({**info, "seen": time.time()}))

    def workers(self, max_age: float = 120.0) -> dict[str, dict[str, Any]]:
        now = time.time()
        out = {}
        for k, v in _hash(self.r.hgetall(P + "workers")).items():
            info = json.loads(v)
            if now - float(info.get("seen", 0)) <= max_age:
                out[k] = info
        return out
