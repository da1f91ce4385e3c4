"""The Redis store: atomic, idempotent updates, against a real Redis server."""

from __future__ import annotations

import threading

from workers.store import FarmStore, sha256


def test_bucket_upsert_counts_each_input_once_and_keeps_the_smallest(store: FarmStore) -> None:
    args = ("b1", "sig", "heap-corruption", "seed")
    # (new, shrank, minimize): a new bucket is minimized; while that is queued a smaller
    # reproducer is not queued again
    assert store.upsert_bucket(*args, "a" * 64, 500, {"n": 1}) == (True, False, True)
    assert store.upsert_bucket(*args, "a" * 64, 500, {"n": 1}) == (False, False, False)
    assert store.upsert_bucket(*args, "b" * 64, 900, {"n": 2}) == (False, False, False)
    assert store.upsert_bucket(*args, "c" * 64, 100, {"n": 3}) == (False, True, False)
    b = store.bucket("b1")
    assert b is not None
    assert (b.count, b.reproducer, b.reproducer_size) == (3, "c" * 64, 100)
    assert store.reproducer_sizes(["b1", "nope"]) == {"b1": 100, "nope": None}
    assert [s["n"] for s in store.bucket_samples("b1")] == [3, 2, 1]


def test_minimization_is_queued_only_when_it_can_help(store: FarmStore) -> None:
    args = ("b3", "sig", "cpu-fault", "seed")
    assert store.upsert_bucket(*args, "a" * 64, 500, {}).minimize
    store.set_minimized("b3", "m" * 64, 60)
    store.mark_minimize_done("b3")
    # the slices now compare against the minimized size
    assert store.reproducer_sizes(["b3"]) == {"b3": 60}
    bigger = store.upsert_bucket(*args, "b" * 64, 200, {})
    assert bigger.shrank and not bigger.minimize  # smaller than 500, not than 60
    assert store.reproducer_sizes(["b3"]) == {"b3": 60}
    smaller = store.upsert_bucket(*args, "c" * 64, 40, {})
    assert smaller.shrank and smaller.minimize
    assert store.reproducer_sizes(["b3"]) == {"b3": 40}
    assert not store.upsert_bucket(*args, "d" * 64, 30, {}).minimize  # one is queued already
    store.mark_minimize_done("b3")
    assert store.upsert_bucket(*args, "e" * 64, 20, {}).minimize


def test_samples_are_bounded_and_slices_mark_buckets_seen(store: FarmStore) -> None:
    for i in range(12):
        store.upsert_bucket("b4", "sig", "hang", "seed", f"{i:064d}", 100, {"n": i})
    assert [s["n"] for s in store.bucket_samples("b4")] == [11, 10, 9, 8, 7]
    b = store.bucket("b4")
    assert b is not None
    store.r.hset("ff:bucket:b4", "last_seen", 1000.0)
    store.mark_seen(["b4"])
    seen = store.bucket("b4")
    assert seen is not None and seen.last_seen > 1000.0
    assert [x.last_seen for x in store.buckets()] == [seen.last_seen]


def test_concurrent_upserts_lose_nothing(store: FarmStore, redis_server) -> None:
    url = redis_server.url

    def worker(i: int) -> None:
        s = FarmStore.connect(url)
        for j in range(25):
            s.upsert_bucket("b2", "sig", "hang", "seed", f"{i:02d}{j:062d}", 1000 - i * 25 - j,
                            {})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b = store.bucket("b2")
    assert b is not None and b.count == 200
    assert b.reproducer_size == 1000 - 7 * 25 - 24
    assert len(store.buckets()) == 1


def test_corpus_is_shared_by_sha_and_sampled(store: FarmStore) -> None:
    inputs = [bytes([i]) * (i + 1) for i in range(50)]
    assert store.corpus_add("seed", inputs) == 50
    assert store.corpus_add("seed", inputs[:10]) == 0
    assert store.corpus_size("seed") == 50
    sample = store.corpus_sample("seed", 5, 10)
    assert 5 <= len(sample) <= 15
    assert all(store.get_blob(s) is not None and sha256(store.get_blob(s)) == s for s in sample)


def test_a_slice_counts_once_in_its_campaign(store: FarmStore) -> None:
    cid = store.create_campaign("seed", 1, 5)
    sid = store.new_slice(cid, "seed", 5)
    assert store.start_slice(sid, "w")
    assert store.finish_slice(sid, cid, {"execs": 100, "edges": 7})
    assert not store.finish_slice(sid, cid, {"execs": 100, "edges": 7})
    assert not store.start_slice(sid, "w")  # a redelivered message does no work twice
    c = store.campaign(cid)
    assert c is not None and (c["execs"], c["edges"], c["slices_done"]) == ("100", "7", "1")
    assert store.inflight(cid) == []
