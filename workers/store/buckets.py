"""Buckets (all crashes with one signature), the reports of the inputs in them, and the
crashing inputs still on their way to triage.

Schema
------
`ff:buckets` (zset)
    Bucket id → last seen.
    Written by: the `UPSERT_BUCKET` script.
`ff:bucket:<id>` (hash)
    `id` (sha256 of the signature, 16 hex), `signature`, `class`, `kernel` (where first
    found), `count`, `first_seen`, `last_seen`, `reproducer` + `reproducer_size` (smallest
    input), `minimized` + `minimized_size`, `minimize_queued` (set when triage queues a
    minimization, cleared when one ends: no second one is queued meanwhile),
    `minimize_done`, `minimize_error`, `verify:<kernel>` (JSON: state
    reproduces/fixed/harness-error, verdict, class, signature, input, time), `crosscheck`
    (JSON: state queued/yes/no/not-run/harness-error, input, and once run: reason,
    differences, after, seconds_emulated, seconds_real, time).
    Written by: triage (`UPSERT_BUCKET`), minimize (`SET_MINIMIZED`, `MINIMIZE_DONE`),
    verify, crosscheck (and whoever queues one: `Buckets.queue_crosscheck`).
`ff:bucket:<id>:inputs` (set)
    Input shas counted in the bucket (makes the count idempotent).
    Written by: `UPSERT_BUCKET`.
`ff:bucket:<id>:samples` (list)
    JSON sample reports (input, kernel, time, class, evidence, symbol), newest first, 5 kept.
    Written by: `UPSERT_BUCKET`.
`ff:bucket-sizes` (hash)
    Bucket id → size of its smallest known input, the minimized one included: lets a slice
    skip triage of what is known, in one command.
    Written by: `UPSERT_BUCKET`, `SET_MINIMIZED`.
`ff:bucket-seen` (hash)
    Bucket id → when a slice last hit it without sending the input to triage; a bucket's
    last seen is the later of this and its own `last_seen`.
    Written by: fuzz slices (`Buckets.mark_seen`, one `HSET` per slice).
`ff:bucket-alias` (hash)
    Bucket id → the bucket it was merged into (`fuzzfarm buckets merge`): triage files the
    id's later inputs there, and slices take its smallest known size from there.
    Written by: `Buckets.merge`.
`ff:bucket-log` (list)
    JSON records of the merges and splits a reviewer made (what, buckets, signatures, time),
    newest first: how often the signatures were wrong.
    Written by: `Buckets.merge`, `Buckets.split`.
`ff:report:<kernel>:<sha256>` (string)
    The Result JSON of that input on that build (full boot for triage and verify, snapshot
    for a minimized input).
    Written by: triage, minimize, verify.
`ff:triage:pending` (zset)
    `<kernel>:<sha256>` → when sent, by Redis's clock: triage not yet finished; the
    controller re-sends entries older than `FUZZFARM_TRIAGE_GRACE`.
    Written by: slices (before sending), triage (removes).
`ff:triage:queued:<kernel>` (string, expires after `QUEUED_TTL` s)
    Set by the slice that sends a triage task for the build, deleted by that task when it
    starts, which then takes every input pending for the build: while it is set, slices add
    their inputs to the pending set and send no task of their own (a worker triages between
    its slices, so one task per flush would pile up faster than workers take them).
    Written by: slices (set), triage (deletes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from workers.store.blobs import blob_key, sha256
from workers.store.connection import Connection, decode, decode_hash, server_time

BUCKETS = "ff:buckets"
SIZES = "ff:bucket-sizes"
SEEN = "ff:bucket-seen"
ALIAS = "ff:bucket-alias"
LOG = "ff:bucket-log"
PENDING = "ff:triage:pending"
QUEUED = "ff:triage:queued:"
# a task sent and never started (lost with its worker) stops holding back new ones after this;
# the controller re-sends its inputs anyway once they are older than the triage grace
QUEUED_TTL = 300
SAMPLES_KEPT = 5


def bucket_key(bucket_id: str) -> str:
    return "ff:bucket:" + bucket_id


def report_key(kernel: str, sha: str) -> str:
    return "ff:report:" + kernel + ":" + sha


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


def _time(value: str | None) -> float | None:
    return float(value) if value else None


def _json(value: str | None) -> dict[str, Any] | None:
    try:
        found = json.loads(value) if value else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


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
    minimize_queued: float | None = None  # a minimization is queued or running
    minimize_done: float | None = None  # when the last one ended
    minimize_error: str | None = None  # why the reproducer could not be minimized
    crosscheck: dict[str, Any] | None = None  # the run on QEMU + OVMF, queued or done

    @classmethod
    def from_hash(cls, h: dict[str, str], seen: Any = None) -> Bucket:
        """`seen`: when a slice last hit the bucket without sending the input to triage."""
        verify = {k.split(":", 1)[1]: json.loads(v) for k, v in h.items()
                  if k.startswith("verify:")}
        last = max(float(h.get("last_seen", 0)), float(decode(seen)) if seen else 0.0)
        return cls(h["id"], h["signature"], h["class"], h["kernel"], int(h.get("count", 0)),
                   float(h.get("first_seen", 0)), last,
                   h.get("reproducer", ""), int(h.get("reproducer_size", 0)),
                   h.get("minimized"), int(h["minimized_size"]) if "minimized_size" in h
                   else None, verify, _time(h.get("minimize_queued")),
                   _time(h.get("minimize_done")), h.get("minimize_error") or None,
                   _json(h.get("crosscheck")))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "signature": self.signature, "class": self.crash_class,
                "kernel": self.kernel, "count": self.count, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "reproducer": self.reproducer,
                "reproducer_size": self.reproducer_size, "minimized": self.minimized,
                "minimized_size": self.minimized_size, "verify": self.verify,
                "crosscheck": self.crosscheck}


class Buckets:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client
        self._upsert = conn.script(UPSERT_BUCKET)
        self._set_min = conn.script(SET_MINIMIZED)
        self._min_done = conn.script(MINIMIZE_DONE)

    def upsert(self, bucket_id: str, signature: str, crash_class: str, kernel: str, sha: str,
               size: int, sample: dict[str, Any]) -> Upsert:
        """Count one crashing input in its bucket. An input already counted changes
        nothing."""
        bucket_id = self.resolve([bucket_id])[0]
        key = bucket_key(bucket_id)
        new, shrank, minimize = self._upsert(
            keys=[key, key + ":inputs", key + ":samples", BUCKETS, SIZES],
            args=[bucket_id, signature, crash_class, kernel, sha, size, time.time(),
                  json.dumps(sample), SAMPLES_KEPT - 1])
        return Upsert(bool(new), bool(shrank), bool(minimize))

    def mark_seen(self, bucket_ids: list[str]) -> None:
        """Known buckets a slice hit again (it sends only new or smaller inputs to triage):
        their last-seen time, all in one command."""
        if bucket_ids:
            self._r.hset(SEEN, mapping=dict.fromkeys(bucket_ids, time.time()))

    def get(self, bucket_id: str) -> Bucket | None:
        with self._r.pipeline(transaction=False) as p:
            p.hgetall(bucket_key(bucket_id))
            p.hget(SEEN, bucket_id)
            raw, seen = p.execute()
        return Bucket.from_hash(decode_hash(raw), seen) if raw else None

    def _ids(self) -> list[str]:
        return [decode(b) for b in self._r.zrevrange(BUCKETS, 0, -1)]

    def all(self) -> list[Bucket]:
        """Every bucket, the last seen first."""
        ids = self._ids()
        if not ids:
            return []
        with self._r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(bucket_key(i))
            p.hmget(SEEN, ids)
            *raws, seen = p.execute()
        return [Bucket.from_hash(decode_hash(raw), t)
                for raw, t in zip(raws, seen, strict=True) if raw]

    def count(self) -> int:
        return int(self._r.zcard(BUCKETS))

    def inputs(self) -> set[str]:
        """The reproducer and minimized input of every bucket."""
        ids = self._ids()
        with self._r.pipeline(transaction=False) as p:
            for bid in ids:
                p.hmget(bucket_key(bid), "reproducer", "minimized")
            rows = p.execute()
        return {decode(v) for row in rows for v in row if v}

    def counted_inputs(self, bucket_id: str) -> set[str]:
        """The input shas the bucket's count counts, each once (what an audit compares the
        count with)."""
        return {decode(s) for s in self._r.smembers(bucket_key(bucket_id) + ":inputs")}

    def samples(self, bucket_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self._r.lrange(bucket_key(bucket_id) + ":samples", 0, -1)]

    def smallest_sizes(self, bucket_ids: list[str]) -> dict[str, int | None]:
        """The size of the smallest known input of each bucket, the minimized one included
        (None: no such bucket), in one command."""
        if not bucket_ids:
            return {}
        sizes = self._r.hmget(SIZES, self.resolve(bucket_ids))
        return {b: int(v) if v is not None else None
                for b, v in zip(bucket_ids, sizes, strict=True)}

    def resolve(self, bucket_ids: list[str]) -> list[str]:
        """Each id, or the bucket it was merged into (one command when nothing was)."""
        out = list(bucket_ids)
        for _ in range(8):  # a merge into a bucket merged later: follow the chain
            targets = self._r.hmget(ALIAS, out) if out else []
            if not any(targets):
                break
            out = [decode(t) if t else b for b, t in zip(out, targets, strict=True)]
        return out

    def merge(self, into: str, others: list[str]) -> Bucket:
        """A reviewer's call that `others` are the same bug as `into`: their inputs, counts,
        samples and smallest reproducers move to `into`, their ids become aliases of it."""
        target = self.get(into)
        if target is None:
            raise KeyError(into)
        moved = []
        for other in dict.fromkeys(others):
            if other == into:
                continue
            b = self.get(other)
            if b is None:
                raise KeyError(other)
            moved.append(b)
        key = bucket_key(into)
        with self._r.pipeline(transaction=True) as p:
            for b in moved:
                okey = bucket_key(b.id)
                p.sunionstore(key + ":inputs", [key + ":inputs", okey + ":inputs"])
                p.hincrby(key, "count", b.count)
                if b.reproducer_size < target.reproducer_size:
                    p.hset(key, mapping={"reproducer": b.reproducer,
                                         "reproducer_size": b.reproducer_size})
                    target.reproducer, target.reproducer_size = b.reproducer, b.reproducer_size
                if b.minimized and (target.minimized_size is None
                                    or (b.minimized_size or 0) < target.minimized_size):
                    p.hset(key, mapping={"minimized": b.minimized,
                                         "minimized_size": b.minimized_size or 0})
                    target.minimized, target.minimized_size = b.minimized, b.minimized_size
                p.hset(key, mapping={"first_seen": min(target.first_seen, b.first_seen),
                                     "last_seen": max(target.last_seen, b.last_seen)})
                target.first_seen = min(target.first_seen, b.first_seen)
                target.last_seen = max(target.last_seen, b.last_seen)
                p.delete(okey, okey + ":inputs", okey + ":samples")
                p.zrem(BUCKETS, b.id)
                p.hdel(SIZES, b.id)
                p.hdel(SEEN, b.id)
                p.hset(ALIAS, b.id, into)
                p.lpush(LOG, json.dumps({"action": "merge", "into": into, "from": b.id,
                                         "signature": b.signature,
                                         "into_signature": target.signature,
                                         "time": time.time()}))
            smallest = min([target.reproducer_size]
                           + ([target.minimized_size] if target.minimized_size else []))
            p.hset(SIZES, into, smallest)
            p.execute()
        merged = self.get(into)
        assert merged is not None
        return merged

    def split(self, bucket_id: str, shas: list[str], name: str, sizes: dict[str, int],
              id_of: Callable[[str], str]) -> Bucket:
        """A reviewer's call that the inputs `shas` of a bucket are another bug: they move
        to a new bucket, its signature the old one plus `[name]` (its id `id_of(signature)`),
        its reproducer the smallest of them. `sizes`: the size of every input the bucket
        counts. Later inputs with the signature still go to the old bucket."""
        old = self.get(bucket_id)
        if old is None:
            raise KeyError(bucket_id)
        counted = self.counted_inputs(bucket_id)
        chosen = list(dict.fromkeys(shas))
        missing = [sha for sha in chosen if sha not in counted]
        if missing:
            raise ValueError(f"not inputs of bucket {bucket_id}: {', '.join(missing)}")
        rest = counted - set(chosen)
        if not rest:
            raise ValueError("a split leaves at least one input in the bucket")
        signature = f"{old.signature} [{name}]"
        new = id_of(signature)
        if self._r.exists(bucket_key(new)):
            raise ValueError(f"bucket {new} ({signature}) exists already")
        now = time.time()
        repro = min(chosen, key=lambda sha: sizes[sha])
        keep = old.reproducer if old.reproducer in rest else min(rest, key=lambda s: sizes[s])
        key, nkey = bucket_key(bucket_id), bucket_key(new)
        with self._r.pipeline(transaction=True) as p:
            p.hset(nkey, mapping={"id": new, "signature": signature, "class": old.crash_class,
                                  "kernel": old.kernel, "first_seen": now, "last_seen": now,
                                  "count": len(chosen), "reproducer": repro,
                                  "reproducer_size": sizes[repro]})
            p.sadd(nkey + ":inputs", *chosen)
            p.srem(key + ":inputs", *chosen)
            p.hincrby(key, "count", -len(chosen))
            if keep != old.reproducer:
                p.hset(key, mapping={"reproducer": keep, "reproducer_size": sizes[keep]})
            p.zadd(BUCKETS, {new: now})
            p.hset(SIZES, new, sizes[repro])
            p.lpush(LOG, json.dumps({"action": "split", "from": bucket_id, "into": new,
                                     "signature": signature, "inputs": chosen, "time": now}))
            p.execute()
        made = self.get(new)
        assert made is not None
        return made

    def review_log(self) -> list[dict[str, Any]]:
        """The merges and splits made so far, newest first."""
        return [json.loads(x) for x in self._r.lrange(LOG, 0, -1)]

    def set_minimized(self, bucket_id: str, sha: str, size: int) -> bool:
        """Record a minimized input (kept if the smallest so far) and that the minimization
        ended; False if it was not the smallest."""
        return bool(self._set_min(keys=[bucket_key(bucket_id), SIZES],
                                  args=[bucket_id, sha, size, time.time()]))

    def minimize_ended(self, bucket_id: str) -> None:
        """A minimization ended without a smaller input: another may be queued again."""
        self._min_done(keys=[bucket_key(bucket_id)], args=[time.time()])

    def set_minimize_error(self, bucket_id: str, error: str) -> None:
        self._r.hset(bucket_key(bucket_id), "minimize_error", error)

    def set_verify(self, bucket_id: str, kernel: str, state: dict[str, Any]) -> None:
        self._r.hset(bucket_key(bucket_id), "verify:" + kernel, json.dumps(state))

    def queue_crosscheck(self, bucket_id: str, sha: str, again: bool = False) -> bool:
        """Mark a crosscheck of input `sha` queued; False (nothing to send) when one of that
        input is queued or done already, unless `again`."""
        key = bucket_key(bucket_id)
        if not self._r.exists(key):
            return False
        if not again:
            known = _json(self._r.hget(key, "crosscheck"))
            if known is not None and known.get("input") == sha:
                return False
        self._r.hset(key, "crosscheck", json.dumps({"state": "queued", "input": sha,
                                                    "time": time.time()}))
        return True

    def set_crosscheck(self, bucket_id: str, state: dict[str, Any]) -> None:
        if self._r.exists(bucket_key(bucket_id)):
            self._r.hset(bucket_key(bucket_id), "crosscheck", json.dumps(state))


class Reports:
    """The Result JSON of an input on a kernel build."""

    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def put_with_input(self, data: bytes, kernel: str, report: dict[str, Any]) -> str:
        """An input and its report in one command; returns the input's sha256."""
        sha = sha256(data)
        self._r.mset({blob_key(sha): data, report_key(kernel, sha): json.dumps(report)})
        return sha

    def put(self, sha: str, kernel: str, report: dict[str, Any]) -> None:
        self.put_many(kernel, {sha: report})

    def put_many(self, kernel: str, reports: dict[str, dict[str, Any]]) -> None:
        if reports:
            self._r.mset({report_key(kernel, sha): json.dumps(report)
                          for sha, report in reports.items()})

    def get(self, sha: str, kernel: str) -> dict[str, Any] | None:
        raw = self._r.get(report_key(kernel, sha))
        return json.loads(raw) if raw else None

    def exists(self, sha: str, kernel: str) -> bool:
        return bool(self._r.exists(report_key(kernel, sha)))


class Triage:
    """Crashing inputs sent to triage and not yet triaged, so none is lost when a worker dies:
    the controller sends those waiting too long again."""

    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def pending(self, shas: list[str], kernel: str) -> None:
        """Recorded before the task is sent."""
        if shas:
            now = server_time(self._r)
            self._r.zadd(PENDING, {f"{kernel}:{sha}": now for sha in shas}, nx=True)

    def done(self, shas: list[str], kernel: str) -> None:
        if shas:
            self._r.zrem(PENDING, *[f"{kernel}:{sha}" for sha in shas])

    def should_send(self, kernel: str) -> bool:
        """Whether to send a triage task for `kernel`'s pending inputs (call after
        :meth:`pending`): not while one sent before has not started yet, since that one takes
        them all (:meth:`starting`)."""
        return bool(self._r.set(QUEUED + kernel, "1", nx=True, ex=QUEUED_TTL))

    def not_sent(self, kernel: str) -> None:
        """The task :meth:`should_send` allowed could not be sent: the next flush sends one."""
        self._r.delete(QUEUED + kernel)

    def starting(self, kernel: str) -> list[str]:
        """A triage task for `kernel` starts: the next input pending sends a task again, and
        this one takes every input pending for the build now (their shas)."""
        self._r.delete(QUEUED + kernel)
        return [sha for sha, k in self.waiting() if k == kernel]

    def stale(self, older_than: float) -> list[tuple[str, str]]:
        """(sha, kernel) of the inputs waiting longer than `older_than` seconds."""
        items = self._r.zrangebyscore(PENDING, 0, server_time(self._r) - older_than)
        out = []
        for item in items:
            kernel, sha = decode(item).rsplit(":", 1)
            out.append((sha, kernel))
        return out

    def touch(self, items: list[tuple[str, str]]) -> None:
        """Restart the grace period of (sha, kernel) entries that are being sent again."""
        if items:
            now = server_time(self._r)
            self._r.zadd(PENDING, {f"{kernel}:{sha}": now for sha, kernel in items}, xx=True)

    def waiting(self) -> list[tuple[str, str]]:
        """(sha, kernel) of every input sent to triage and not yet triaged."""
        return [(sha, kernel) for kernel, sha in
                (decode(item).rsplit(":", 1) for item in self._r.zrange(PENDING, 0, -1))]

    def backlog(self) -> int:
        return int(self._r.zcard(PENDING))
