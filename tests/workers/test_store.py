"""The Redis store: atomic, idempotent updates, against a real Redis server."""

from __future__ import annotations

import threading

from workers.store import FarmStore, sha256


def test_bucket_upsert_counts_each_input_once_and_keeps_the_smallest(store: FarmStore) -> None:
    args = ("b1", "sig", "heap-corruption", "seed")
    assert store.upsert_bucket(*args, "a" * 64, 500, {"n": 1}) == (True, False)
    assert store.upsert_bucket(*args, "a" * 64, 500, {"n": 1}) == (False, False)  # again
    assert store.upsert_bucket(*args, "b" * 64, 900, {"n": 2}) == (False, False)
    assert store.upsert_bucket(*args, "c" * 64, 100, {"n": 3}) == (False, True)
    b = store.bucket("b1")
    assert b is not None
    assert (b.count, b.reproducer, b.reproducer_size) == (3, "c" * 64, 100)
    assert store.reproducer_sizes(["b1", "nope"]) == {"b1": 100, "nope": None}
    assert [s["n"] for s in store.bucket_samples("b1")] == [3, 2, 1]


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
