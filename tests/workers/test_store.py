"""The Redis store: atomic, idempotent updates, and the on-Redis format, against a real Redis
server."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from tests.workers.conftest import RedisServer
from workers.store import FarmStore, StoreUnavailable, sha256

pytestmark = pytest.mark.redis


@pytest.fixture
def raw(redis_server: RedisServer) -> redis.Redis:
    """A plain client, to write and read keys as they sit in Redis."""
    return redis.Redis.from_url(redis_server.url, decode_responses=True)


def test_bucket_upsert_counts_each_input_once_and_keeps_the_smallest(store: FarmStore) -> None:
    args = ("b1", "sig", "heap-corruption", "seed")
    # (new, shrank, minimize): a new bucket is minimized; while that is queued a smaller
    # reproducer is not queued again
    assert store.buckets.upsert(*args, "a" * 64, 500, {"n": 1}) == (True, False, True)
    assert store.buckets.upsert(*args, "a" * 64, 500, {"n": 1}) == (False, False, False)
    assert store.buckets.upsert(*args, "b" * 64, 900, {"n": 2}) == (False, False, False)
    assert store.buckets.upsert(*args, "c" * 64, 100, {"n": 3}) == (False, True, False)
    b = store.buckets.get("b1")
    assert b is not None
    assert (b.count, b.reproducer, b.reproducer_size) == (3, "c" * 64, 100)
    assert b.minimize_queued is not None and b.minimize_done is None
    assert store.buckets.smallest_sizes(["b1", "nope"]) == {"b1": 100, "nope": None}
    assert [s["n"] for s in store.buckets.samples("b1")] == [3, 2, 1]


def test_minimization_is_queued_only_when_it_can_help(store: FarmStore) -> None:
    args = ("b3", "sig", "cpu-fault", "seed")
    assert store.buckets.upsert(*args, "a" * 64, 500, {}).minimize
    store.buckets.set_minimized("b3", "m" * 64, 60)
    store.buckets.minimize_ended("b3")
    ended = store.buckets.get("b3")
    assert ended is not None and ended.minimize_queued is None and ended.minimize_done
    # the slices now compare against the minimized size
    assert store.buckets.smallest_sizes(["b3"]) == {"b3": 60}
    bigger = store.buckets.upsert(*args, "b" * 64, 200, {})
    assert bigger.shrank and not bigger.minimize  # smaller than 500, not than 60
    assert store.buckets.smallest_sizes(["b3"]) == {"b3": 60}
    smaller = store.buckets.upsert(*args, "c" * 64, 40, {})
    assert smaller.shrank and smaller.minimize
    assert store.buckets.smallest_sizes(["b3"]) == {"b3": 40}
    assert not store.buckets.upsert(*args, "d" * 64, 30, {}).minimize  # one is queued already
    store.buckets.minimize_ended("b3")
    assert store.buckets.upsert(*args, "e" * 64, 20, {}).minimize


def test_samples_are_bounded_and_slices_mark_buckets_seen(store: FarmStore,
                                                          raw: redis.Redis) -> None:
    for i in range(12):
        store.buckets.upsert("b4", "sig", "hang", "seed", f"{i:064d}", 100, {"n": i})
    assert [s["n"] for s in store.buckets.samples("b4")] == [11, 10, 9, 8, 7]
    raw.hset("ff:bucket:b4", "last_seen", 1000.0)  # seen long ago by triage
    store.buckets.mark_seen(["b4"])
    seen = store.buckets.get("b4")
    assert seen is not None and seen.last_seen > 1000.0
    assert [x.last_seen for x in store.buckets.all()] == [seen.last_seen]


def test_concurrent_upserts_lose_nothing(store: FarmStore, redis_server: RedisServer) -> None:
    url = redis_server.url

    def worker(i: int) -> None:
        s = FarmStore.connect(url)
        for j in range(25):
            s.buckets.upsert("b2", "sig", "hang", "seed", f"{i:02d}{j:062d}",
                             1000 - i * 25 - j, {})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b = store.buckets.get("b2")
    assert b is not None and b.count == 200
    assert b.reproducer_size == 1000 - 7 * 25 - 24
    assert len(store.buckets.all()) == 1


def test_corpus_is_shared_by_sha_and_sampled(store: FarmStore) -> None:
    inputs = [bytes([i]) * (i + 1) for i in range(50)]
    assert store.corpus.add("seed", inputs) == 50
    assert store.corpus.add("seed", inputs[:10]) == 0
    assert store.corpus.size("seed") == 50
    sample = store.corpus.sample("seed", 5, 10)
    assert 5 <= len(sample) <= 15
    for sha in sample:
        data = store.blobs.get(sha)
        assert data is not None and sha256(data) == sha


def test_a_slice_counts_once_in_its_campaign(store: FarmStore) -> None:
    cid = store.campaigns.create("seed", 1, 5)
    sid = store.campaigns.new_slice(cid, "seed", 5)
    assert store.campaigns.claim_slice(sid, "w")
    assert store.campaigns.finish_slice(sid, cid, {"execs": 100, "edges": 7})
    assert not store.campaigns.finish_slice(sid, cid, {"execs": 100, "edges": 7})
    assert not store.campaigns.claim_slice(sid, "w")  # a redelivered message does no work twice
    c = store.campaigns.get(cid)
    assert c is not None and (c.execs, c.edges, c.slices_done) == (100, 7, 1)
    assert store.campaigns.inflight(cid) == []
    done = store.campaigns.slice(sid)
    assert done is not None and done.state == "done" and done.stats == {"execs": 100,
                                                                         "edges": 7}


def test_a_campaign_s_state_change_reaches_its_watchers_and_the_controller(
        store: FarmStore) -> None:
    cid = store.campaigns.create("seed", 1, 5)
    assert store.campaigns.wait_for_wake(1)  # creation wakes the controller
    watch = store.campaigns.watch_state(cid)
    try:
        assert watch.next_state(timeout=0.1) is None
        store.campaigns.set_state(cid, "stopping")
        assert watch.next_state(timeout=5) == "stopping"
    finally:
        watch.close()
    assert store.campaigns.wait_for_wake(1)
    assert [c.id for c in store.campaigns.active()] == [cid]
    store.campaigns.set_state(cid, "stopped")
    assert store.campaigns.active() == [] and store.campaigns.state(cid) == "stopped"


def test_harness_errors_are_counted_and_the_newest_kept(store: FarmStore) -> None:
    for i in range(60):
        store.stats.record_harness_error("triage", f"error {i}", None if i % 2 else "a" * 64)
    assert store.stats.counters()["harness_errors"] == 60
    kept = store.stats.harness_errors()
    assert len(kept) == 50 and kept[0].error == "error 59" and kept[-1].error == "error 10"
    assert kept[1].input == "a" * 64 and kept[0].input is None


def test_a_store_whose_redis_is_down_says_so(redis_server: RedisServer) -> None:
    store = FarmStore.connect(redis_server.url)
    store.ping()
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.buckets.all()


# the on-Redis format ------------------------------------------------------------------------

def test_data_written_before_the_store_was_split_still_loads(store: FarmStore,
                                                             raw: redis.Redis) -> None:
    """Keys as the farm wrote them before its store became one module per aggregate."""
    raw.hset("ff:campaign:c0ffee", mapping={
        "id": "c0ffee", "kernel": "seed", "state": "running", "slices": "2",
        "slice_seconds": "60.0", "created": "1700000000.5", "execs": "1234",
        "edges": "77", "slices_done": "3"})
    raw.zadd("ff:campaigns", {"c0ffee": 1700000000.5})
    raw.sadd("ff:campaigns:active", "c0ffee")
    raw.hset("ff:slice:5l1ce", mapping={
        "id": "5l1ce", "campaign": "c0ffee", "kernel": "seed", "seconds": "60.0",
        "state": "running", "queued": "1700000001.0", "worker": "w1@host",
        "started": "1700000002.0"})
    raw.sadd("ff:campaign:c0ffee:inflight", "5l1ce")
    raw.hset("ff:bucket:0123456789abcdef", mapping={
        "id": "0123456789abcdef", "signature": "hang | a | b | c", "class": "hang",
        "kernel": "seed", "first_seen": "1700000003.0", "last_seen": "1700000004.0",
        "count": "2", "reproducer": "b" * 64, "reproducer_size": "900",
        "minimized": "c" * 64, "minimized_size": "120", "minimize_done": "1700000005.0",
        "verify:fixed": json.dumps({"state": "fixed", "time": 1700000006.0})})
    raw.zadd("ff:buckets", {"0123456789abcdef": 1700000004.0})
    raw.hset("ff:bucket-seen", "0123456789abcdef", "1700000009.0")
    raw.set("ff:report:seed:" + "b" * 64, json.dumps({"verdict": "crash"}))
    raw.rpush("ff:campaign:c0ffee:series", json.dumps({"t": 1.0, "execs_per_second": 5.0}))
    raw.hset("ff:workers", "w1@host", json.dumps({"task": "fuzz", "slice": "5l1ce",
                                                  "seen": 4102444800.0}))
    raw.lpush("ff:harness-errors", json.dumps({"where": "triage", "error": "boom",
                                               "input": None, "time": 1700000007.0}))
    raw.set("ff:coverage:seed", json.dumps({"kernel": "seed", "blocks": [[16, 4]]}))

    (c,) = store.campaigns.active()
    assert (c.id, c.kernel, c.state, c.slices, c.slice_seconds, c.execs, c.edges,
            c.slices_done) == ("c0ffee", "seed", "running", 2, 60.0, 1234, 77, 3)
    (s,) = store.campaigns.slices(store.campaigns.inflight("c0ffee"))
    assert (s.state, s.worker, s.started, s.finished, s.stats) == (
        "running", "w1@host", 1700000002.0, None, None)
    b = store.buckets.get("0123456789abcdef")
    assert b is not None
    assert (b.count, b.minimized_size, b.last_seen, b.verify["fixed"]["state"]) == (
        2, 120, 1700000009.0, "fixed")
    assert b.minimize_done == 1700000005.0 and b.minimize_queued is None
    assert store.buckets.inputs() == {"b" * 64, "c" * 64}
    assert store.reports.get("b" * 64, "seed") == {"verdict": "crash"}
    assert store.stats.latest_point("c0ffee") == {"t": 1.0, "execs_per_second": 5.0}
    assert store.stats.workers()["w1@host"].slice == "5l1ce"
    assert store.stats.harness_errors()[0].error == "boom"
    assert store.coverage.record("seed") == {"kernel": "seed", "blocks": [[16, 4]]}


def test_writes_use_the_schema_s_keys_and_fields(store: FarmStore, raw: redis.Redis) -> None:
    cid = store.campaigns.create("seed", 2, 30.0)
    sid = store.campaigns.new_slice(cid, "seed", 30.0)
    assert set(raw.hgetall(f"ff:campaign:{cid}")) == {
        "id", "kernel", "state", "slices", "slice_seconds", "first_slice_seconds", "created",
        "execs", "edges", "slices_done"}
    assert raw.smembers(f"ff:campaign:{cid}:inflight") == {sid}
    assert raw.hget(f"ff:slice:{sid}", "state") == "queued"
    sha = store.blobs.put(b"input")
    assert raw.exists(f"ff:blob:{sha}")
    store.buckets.upsert("feedfacefeedface", "sig", "hang", "seed", sha, 5, {})
    assert raw.hget("ff:bucket:feedfacefeedface", "reproducer") == sha
    assert raw.smembers("ff:bucket:feedfacefeedface:inputs") == {sha}
    assert raw.hget("ff:bucket-sizes", "feedfacefeedface") == "5"
    store.triage.pending([sha], "seed")
    assert raw.zrange("ff:triage:pending", 0, -1) == [f"seed:{sha}"]
    assert store.triage.should_send("seed")
    assert raw.get("ff:triage:queued:seed") == "1" and raw.ttl("ff:triage:queued:seed") > 0
    store.stats.heartbeat("w@h", "fuzz", sid)
    beat = json.loads(raw.hget("ff:workers", "w@h"))
    assert list(beat) == ["task", "slice", "seen"] and beat["slice"] == sid
    store.stats.heartbeat("w@h", None)
    assert list(json.loads(raw.hget("ff:workers", "w@h"))) == ["task", "seen"]
    store.stats.record_harness_error("here", "why", sha)
    assert list(json.loads(raw.lindex("ff:harness-errors", 0))) == ["where", "error",
                                                                     "input", "time"]
    assert store.coverage.claim_job("seed", 3)
    assert json.loads(raw.get("ff:coverage-job:seed"))["state"] == "starting"
    assert 0 < raw.ttl("ff:coverage-job:seed") <= 6 * 3600
    assert raw.smembers("ff:kernels") >= {"seed", "fixed"}
    assert set(raw.hgetall("ff:kernel:seed")) == {"name", "profile", "image", "map", "debug",
                                                  "description", "added"}
    store.buckets.queue_crosscheck("feedfacefeedface", sha)
    assert list(json.loads(raw.hget("ff:bucket:feedfacefeedface", "crosscheck"))) == [
        "state", "input", "time"]


def test_a_merge_moves_inputs_and_later_ones_follow(store: FarmStore) -> None:
    sig = ("keep", "gone")
    store.buckets.upsert("k1", sig[0], "heap-corruption", "seed", "a" * 64, 500, {})
    store.buckets.upsert("g1", sig[1], "heap-corruption", "seed", "b" * 64, 90, {})
    store.buckets.upsert("g1", sig[1], "heap-corruption", "seed", "c" * 64, 700, {})
    merged = store.buckets.merge("k1", ["g1"])
    assert (merged.count, merged.reproducer, merged.reproducer_size) == (3, "b" * 64, 90)
    assert store.buckets.get("g1") is None and [b.id for b in store.buckets.all()] == ["k1"]
    # a later input of the merged signature lands in the bucket kept, once
    store.buckets.upsert("g1", sig[1], "heap-corruption", "seed", "d" * 64, 50, {})
    store.buckets.upsert("g1", sig[1], "heap-corruption", "seed", "b" * 64, 90, {})
    kept = store.buckets.get("k1")
    assert kept is not None and (kept.count, kept.reproducer_size) == (4, 50)
    assert store.buckets.counted_inputs("k1") == {c * 64 for c in "abcd"}
    assert store.buckets.smallest_sizes(["g1"]) == {"g1": 50}
    assert [(e["action"], e["from"], e["into"]) for e in store.buckets.review_log()] == [
        ("merge", "g1", "k1")]
    with pytest.raises(KeyError):
        store.buckets.merge("k1", ["nope"])


def test_a_split_moves_the_inputs_named(store: FarmStore) -> None:
    for sha, size in (("a" * 64, 10), ("b" * 64, 20), ("c" * 64, 30)):
        store.buckets.upsert("s1", "sig", "vaddr-corruption", "seed", sha, size, {})
    sizes = {"a" * 64: 10, "b" * 64: 20, "c" * 64: 30}
    made = store.buckets.split("s1", ["a" * 64, "c" * 64], "RX-99", sizes,
                               lambda s: "n" + s[-4:-1].encode().hex()[:15])
    assert made.signature == "sig [RX-99]" and (made.count, made.reproducer_size) == (2, 10)
    old = store.buckets.get("s1")
    assert old is not None and (old.count, old.reproducer, old.reproducer_size) == (
        1, "b" * 64, 20)
    assert store.buckets.counted_inputs(made.id) == {"a" * 64, "c" * 64}
    with pytest.raises(ValueError, match="at least one input"):
        store.buckets.split("s1", ["b" * 64], "all", sizes, lambda s: "x" * 16)
    with pytest.raises(ValueError, match="not inputs"):
        store.buckets.split("s1", ["e" * 64], "none", sizes, lambda s: "y" * 16)
    assert [e["action"] for e in store.buckets.review_log()] == ["split"]


def test_one_triage_task_at_a_time_is_queued_per_build(store: FarmStore) -> None:
    """While a triage task of a build waits in the queue, flushes send none of their own: the
    task takes every input pending for its build when it starts."""
    store.triage.pending(["a1"], "seed")
    assert store.triage.should_send("seed")
    store.triage.pending(["a2"], "seed")
    assert not store.triage.should_send("seed")  # the queued task will take a2 too
    store.triage.pending(["b1"], "fixed")
    assert store.triage.should_send("fixed")  # another build: a task of its own
    assert sorted(store.triage.starting("seed")) == ["a1", "a2"]
    store.triage.done(["a1", "a2"], "seed")
    store.triage.pending(["a3"], "seed")
    assert store.triage.should_send("seed")  # the task started: the next input sends one
    store.triage.not_sent("seed")  # ... which the broker refused
    assert store.triage.should_send("seed")
    assert store.triage.starting("fixed") == ["b1"]
