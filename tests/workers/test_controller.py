"""The controller against a real Redis: slices kept in flight, lost work replaced, campaigns
stopped, wake-ups instead of polling; and the controller process as docker-compose runs it.

In this process the controller is given plain functions to send with, so a test sees exactly
what it sent; the process tests send real Celery messages."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.workers.conftest import Farm, RedisServer, wait_for
from workers.controller import Controller
from workers.settings import Settings
from workers.store import FarmStore

pytestmark = pytest.mark.redis


class Sent:
    """What a controller sent: slice ids, and (kernel, shas) triage batches."""

    def __init__(self) -> None:
        self.slices: list[str] = []
        self.triage: list[tuple[str, list[str]]] = []

    def slice(self, sid: str) -> None:
        self.slices.append(sid)

    def triage_batch(self, kernel: str, shas: list[str]) -> None:
        self.triage.append((kernel, sorted(shas)))


def controller(store: FarmStore, url: str, sent: Sent, *, lost_grace: float = 600.0,
               visibility: float = 600.0, triage_grace: float = 600.0) -> Controller:
    return Controller(store, Settings(redis_url=url, visibility_timeout=visibility),
                      sent.slice, sent.triage_batch, lost_grace=lost_grace,
                      triage_grace=triage_grace)


def stepped_until(c: Controller, condition: Callable[[], object]) -> Callable[[], object]:
    """A condition for wait_for that runs a controller step before each look."""
    def check() -> object:
        c.step()
        return condition()
    return check


def test_a_running_campaign_keeps_its_slices_in_flight(store: FarmStore,
                                                       redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent)
    cid = store.campaigns.create("seed", 3, 30.0)
    c.step()
    assert len(sent.slices) == 3 and sorted(sent.slices) == store.campaigns.inflight(cid)
    assert all(store.campaigns.slice(s).state == "queued" for s in sent.slices)
    c.step()
    assert len(sent.slices) == 3  # nothing more while those are in flight
    first = sent.slices[0]
    assert store.campaigns.claim_slice(first, "w@h")
    store.campaigns.finish_slice(first, cid, {"execs": 500, "edges": 9})
    c.step(full=False)  # a wake-up's step
    assert len(sent.slices) == 4 and first not in store.campaigns.inflight(cid)
    assert store.campaigns.inflight(cid) == sorted(sent.slices[1:])
    point = store.stats.latest_point(cid)  # the first step's point of the time series
    assert point["execs"] == 0 and point["corpus"] == 0 and point["workers"] == 0
    store.campaigns.set_slices(cid, 1)
    c.step()
    assert len(sent.slices) == 4  # fewer wanted: none sent, none taken back


def test_a_new_campaign_s_first_slices_are_short_until_one_finishes(
        store: FarmStore, redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent)
    cid = store.campaigns.create("seed", 2, 60.0, first_slice_seconds=15.0)
    plain = store.campaigns.create("seed", 1, 60.0)
    c.step()
    seconds = {s: store.campaigns.slice(s).seconds for s in sent.slices}
    short = store.campaigns.inflight(cid)
    assert sorted(seconds[s] for s in short) == [15.0, 15.0]
    assert [seconds[s] for s in store.campaigns.inflight(plain)] == [60.0]
    # one lost before any finished: its replacement is short too
    store.campaigns.drop_slice(short[0], cid, "lost")
    c.step()
    assert store.campaigns.slice(sent.slices[-1]).seconds == 15.0
    # once a slice finished, the campaign's slices are full length
    assert store.campaigns.claim_slice(short[1], "w@h")
    store.campaigns.finish_slice(short[1], cid, {"execs": 500, "edges": 9})
    c.step(full=False)
    assert store.campaigns.slice(sent.slices[-1]).seconds == 60.0
    campaign = store.campaigns.get(cid)
    assert campaign is not None and campaign.first_slice_seconds == 15.0
    # a first length not below the others changes nothing
    long_first = store.campaigns.create("seed", 1, 10.0, first_slice_seconds=15.0)
    c.step()
    assert [store.campaigns.slice(s).seconds
            for s in store.campaigns.inflight(long_first)] == [10.0]


def test_a_slice_whose_worker_died_is_marked_lost_and_replaced(
        store: FarmStore, redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent, lost_grace=1.0)
    cid = store.campaigns.create("seed", 1, 1.0)
    c.step()
    (running,) = sent.slices
    store.campaigns.claim_slice(running, "w@h")
    c.step()
    assert sent.slices == [running]  # running, not yet overdue
    wait_for(stepped_until(c, lambda: store.stats.counters().get("slices_lost")), 15,
             "the running slice to be declared lost", poll=0.2)
    assert store.stats.counters()["slices_lost"] == 1
    assert store.campaigns.slice(running).state == "lost"
    (_, replacement) = sent.slices
    assert store.campaigns.inflight(cid) == [replacement]
    # a lost slice reported late still counts once, and is no longer in flight
    assert store.campaigns.finish_slice(running, cid, {"execs": 10, "edges": 1})
    assert store.campaigns.get(cid).execs == 10
    assert store.campaigns.inflight(cid) == [replacement]


def test_a_slice_never_taken_off_the_queue_is_replaced(store: FarmStore,
                                                       redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent, visibility=1.0)
    cid = store.campaigns.create("seed", 1, 1.0)
    c.step()
    (queued,) = sent.slices
    wait_for(stepped_until(c, lambda: store.stats.counters().get("slices_lost")), 15,
             "the queued slice to be declared lost", poll=0.2)
    assert store.campaigns.slice(queued).state == "lost"
    assert len(sent.slices) == 2 and store.campaigns.inflight(cid) == [sent.slices[1]]


def test_stopping_a_campaign_lets_its_slices_end_then_stops_it(
        store: FarmStore, redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent)
    cid = store.campaigns.create("seed", 2, 30.0)
    c.step()
    store.campaigns.set_state(cid, "stopping")
    c.step()
    assert len(sent.slices) == 2  # no new slice for a stopping campaign
    assert store.campaigns.state(cid) == "stopping"  # its slices are still out
    first, second = sent.slices
    store.campaigns.claim_slice(first, "w@h")
    store.campaigns.finish_slice(first, cid, {"execs": 1, "edges": 1})
    store.campaigns.drop_slice(second, cid, "cancelled")  # as a worker does on a stopped one
    c.step(full=False)
    assert store.campaigns.state(cid) == "stopped"
    assert store.campaigns.active() == []
    c.step()
    assert len(sent.slices) == 2


def test_triage_that_never_finished_is_sent_again_once_per_grace(
        store: FarmStore, redis_server: RedisServer) -> None:
    sent = Sent()
    c = controller(store, redis_server.url, sent, triage_grace=1.0)
    store.triage.pending(["a" * 64, "b" * 64], "seed")
    store.triage.pending(["c" * 64], "fixed")
    c.step()
    assert sent.triage == []  # within the grace period
    wait_for(stepped_until(c, lambda: sent.triage), 15, "the stale triage to be sent again",
             poll=0.2)
    assert sorted(sent.triage) == [("fixed", ["c" * 64]), ("seed", ["a" * 64, "b" * 64])]
    assert store.stats.counters()["triage_resent"] == 3
    c.step()
    assert len(sent.triage) == 2  # sent again only after another grace period
    assert store.triage.backlog() == 3  # still pending until a triage finishes


@pytest.fixture
def running_controller(store: FarmStore, redis_server: RedisServer) -> Iterator[Sent]:
    """A controller running its loop in a thread, waiting on the store's wake-up list, with a
    sweep (45 s) longer than any wait in these tests."""
    sent = Sent()
    c = controller(store, redis_server.url, sent, lost_grace=90.0)
    stop = threading.Event()
    thread = threading.Thread(target=c.run, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    yield sent
    stop.set()
    store.campaigns.create("seed", 0, 1.0)  # any campaign change wakes it
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_the_controller_is_woken_instead_of_polling(store: FarmStore,
                                                    running_controller: Sent) -> None:
    sent = running_controller
    cid = store.campaigns.create("seed", 2, 30.0)
    wait_for(lambda: len(sent.slices) == 2, 10, "the new campaign's slices", poll=0.1)
    first = sent.slices[0]
    store.campaigns.claim_slice(first, "w@h")
    store.campaigns.finish_slice(first, cid, {"execs": 1, "edges": 1})
    wait_for(lambda: len(sent.slices) == 3, 10, "a slice to replace the finished one",
             poll=0.1)
    store.campaigns.set_slices(cid, 3)
    wait_for(lambda: len(sent.slices) == 4, 10, "a slice for the new count", poll=0.1)


# the controller process ----------------------------------------------------------------------

@pytest.mark.farm
def test_the_configured_campaign_is_started_once_and_follows_its_slice_count(
        farm: Farm, store: FarmStore, redis_server: RedisServer) -> None:
    """FUZZFARM_CAMPAIGN / FUZZFARM_CAMPAIGN_SLICES, as docker-compose sets them; no worker,
    so the slices wait in the `fuzz` queue as real Celery messages."""
    queue = redis.Redis.from_url(redis_server.url)

    def fuzz_messages() -> list[str]:
        return [json.loads(m)["headers"]["task"] for m in queue.lrange("fuzz", 0, -1)]

    farm.env.update(FUZZFARM_CAMPAIGN="seed", FUZZFARM_CAMPAIGN_SLICES="2")
    proc = farm.controller()
    (campaign,) = wait_for(lambda: store.campaigns.active(), 60, "the configured campaign")
    assert (campaign.kernel, campaign.slices, campaign.state) == ("seed", 2, "running")
    wait_for(lambda: len(store.campaigns.inflight(campaign.id)) == 2
             and len(fuzz_messages()) == 2, 30, "two slices sent to the fuzz queue")
    assert fuzz_messages() == ["workers.tasks.fuzz_slice"] * 2

    os.killpg(proc.pid, signal.SIGTERM)  # ends its blocking wait at once
    assert proc.wait(timeout=20) == 0
    farm.env["FUZZFARM_CAMPAIGN_SLICES"] = "3"
    farm.controller()  # restarted with a new count, as after `--scale worker=3`
    wait_for(lambda: store.campaigns.get(campaign.id).slices == 3, 60,
             "the running campaign to take the new count")
    # a slice is recorded in flight before its message is sent: wait for both
    wait_for(lambda: len(store.campaigns.inflight(campaign.id)) == 3
             and len(fuzz_messages()) == 3, 30, "a third slice sent")
    assert [c.id for c in store.campaigns.all()] == [campaign.id]  # no second campaign
