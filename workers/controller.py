"""The controller keeps campaigns going: N fuzz slices in flight per running campaign, lost
slices replaced, unfinished triage sent again, a time series of progress for the dashboard.

It holds no state of its own (everything is in Redis), so it can be restarted at any time;
run exactly one per farm: ``python -m workers.controller`` or ``fuzzfarm controller``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from workers.settings import Settings, redact_url
from workers.store import Campaign, FarmStore, StoreError

log = logging.getLogger("fuzzfarm.controller")

SERIES_INTERVAL = 60.0
# The controller wakes when a slice finishes or a campaign changes (a blocking pop: one
# command), and at least every half lost-slice grace (at most this often) to look for lost
# work, which costs ~5 commands a look.
MAX_SWEEP = 60.0
TRIAGE_GRACE = 120.0  # a triage task takes seconds; one pending this long was lost


class Controller:
    def __init__(self, store: FarmStore, settings: Settings,
                 send_slice: Callable[[str], Any],
                 send_triage: Callable[[str, list[str]], Any],
                 *, lost_grace: float = 90.0, triage_grace: float = TRIAGE_GRACE) -> None:
        self.store = store
        self.settings = settings
        self.send_slice = send_slice
        self.send_triage = send_triage
        self.lost_grace = lost_grace
        self.triage_grace = triage_grace
        self._last_point: dict[str, float] = {}
        self._last_execs: dict[str, tuple[float, int]] = {}
        self._last_full = 0.0

    def step(self, full: bool = True) -> None:
        """Keep every campaign's slices in flight. A full step also looks for lost slices and
        lost triage; a step on a wake-up (a slice finished, a campaign changed) need not."""
        now = time.time()
        if full:
            self._last_full = now
        campaigns = self.store.campaigns
        server_now: float | None = None  # Redis's clock, which slice times are written in
        for campaign in campaigns.active():
            state = campaign.state
            if state not in ("running", "stopping"):
                continue
            cid = campaign.id
            if full and server_now is None:
                server_now = campaigns.server_time()
            inflight = (self._check_inflight(cid, campaign.slice_seconds, server_now)
                        if server_now is not None else campaigns.inflight(cid))
            if state == "running":
                for _ in range(campaign.slices - len(inflight)):
                    sid = campaigns.new_slice(cid, campaign.kernel,
                                              campaign.next_slice_seconds())
                    try:
                        self.send_slice(sid)
                    except Exception:
                        campaigns.drop_slice(sid, cid, "unsent")  # the next step tries again
                        raise
            elif not inflight:
                campaigns.set_state(cid, "stopped", paused=campaign.paused)
            if now - self._last_point.get(cid, 0.0) >= SERIES_INTERVAL:
                self._point(campaign, now)
        stale = self.store.triage.stale(self.triage_grace) if full else []
        if stale:
            self.store.triage.touch(stale)
            self.store.stats.count("triage_resent", len(stale))
            by_kernel: dict[str, list[str]] = {}
            for sha, kernel in stale:
                by_kernel.setdefault(kernel, []).append(sha)
            for kernel, shas in by_kernel.items():
                self.send_triage(kernel, shas)

    def _check_inflight(self, cid: str, seconds: float, now: float) -> list[str]:
        """The slices still in flight; those lost are replaced. `now` is Redis's clock, as the
        slices' times are: a running slice reports progress every few seconds, so one unseen
        for the lost-slice grace has lost its worker, whatever the workers' clocks say."""
        alive = []
        for info in self.store.campaigns.slices(self.store.campaigns.inflight(cid)):
            state = info.state
            seen = info.seen or info.started or 0.0
            queued = info.queued or 0.0
            lost = (state == "running" and now - seen > self.lost_grace) or (
                state == "queued" and now - queued > self.settings.visibility_timeout + seconds)
            if state in ("done", "cancelled"):
                continue
            if lost:
                # its worker died (or the message vanished): another slice takes its place
                self.store.campaigns.drop_slice(info.id, cid, "lost")
                self.store.stats.count("slices_lost")
                log.warning("slice %s of campaign %s lost; replacing it", info.id, cid)
                continue
            alive.append(info.id)
        return alive

    def _point(self, campaign: Campaign, now: float) -> None:
        cid = campaign.id
        self._last_point[cid] = now
        prev_t, prev_execs = self._last_execs.get(cid, (now, campaign.execs))
        rate = (campaign.execs - prev_execs) / (now - prev_t) if now > prev_t else 0.0
        self._last_execs[cid] = (now, campaign.execs)
        self.store.stats.add_series_point(cid, {
            "t": now, "execs": campaign.execs, "execs_per_second": rate,
            "edges": campaign.edges, "corpus": self.store.corpus.size(campaign.kernel),
            "buckets": self.store.buckets.count(),
            "workers": len(self.store.stats.workers())})

    def run(self, stop: Callable[[], bool] = lambda: False,
            wait: Callable[[float], Any] | None = None) -> None:
        """Step, then wait for a wake-up (`wait`, by default a blocking pop on the store's
        wake-up list) or a sweep's time: a lost slice is replaced within 1.5 grace periods."""
        wait = wait or self.store.campaigns.wait_for_wake
        sweep = min(MAX_SWEEP, max(1.0, self.lost_grace / 2))
        woken = False
        while not stop():
            try:
                self.step(full=not woken or time.time() - self._last_full >= sweep)
                woken = False
                if not stop():
                    woken = bool(wait(sweep))
            except Exception as e:  # noqa: BLE001 - Redis restarting, say: try again shortly
                log.warning("controller step failed: %s", e)
                time.sleep(2.0)


class _Stop(Exception):
    """Raised by the signal handler to end a blocking wait at once."""


def _start_configured_campaign(store: FarmStore) -> None:
    """FUZZFARM_CAMPAIGN=<kernel build> (as docker-compose sets it): make sure a campaign runs
    on that build, with FUZZFARM_CAMPAIGN_SLICES slices in flight (default 2)."""
    kernel = os.environ.get("FUZZFARM_CAMPAIGN")
    if not kernel:
        return
    from workers.kernels import ensure_builtin

    slices = int(os.environ.get("FUZZFARM_CAMPAIGN_SLICES") or 2)
    settings = Settings.from_env()
    while True:
        try:
            ensure_builtin(store)
            if kernel not in store.kernels.names():
                log.error("FUZZFARM_CAMPAIGN names an unknown kernel build '%s'", kernel)
                return
            running = [c for c in store.campaigns.active()
                       if c.state == "running" and c.kernel == kernel]
            for c in running:
                if c.slices != slices:  # e.g. after --scale worker=N
                    store.campaigns.set_slices(c.id, slices)
                    log.info("campaign %s now keeps %d slices in flight", c.id, slices)
            if not running:
                cid = store.campaigns.create(kernel, slices, settings.slice_seconds,
                                             settings.first_slice_seconds)
                log.info("started campaign %s on %s", cid, kernel)
            return
        except StoreError as e:
            log.warning("waiting for Redis: %s", e)
            time.sleep(2.0)


def main() -> int:
    from workers import tasks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(message)s")
    settings = Settings.from_env()
    store = FarmStore.connect(settings.redis_url, "controller")
    stopping = False
    waiting = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if waiting:  # only a wait is interrupted, never a step halfway through its writes
            raise _Stop

    def wait(seconds: float) -> bool:
        nonlocal waiting
        waiting = True
        try:
            return not stopping and store.campaigns.wait_for_wake(seconds)
        except _Stop:
            return False
        finally:
            waiting = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller = Controller(store, settings, lambda sid: tasks.fuzz_slice.delay(sid),
                            lambda kernel, shas: tasks.triage_many.delay(kernel, shas),
                            lost_grace=settings.lost_grace, triage_grace=settings.triage_grace)
    log.info("controller started on %s", redact_url(settings.redis_url))
    _start_configured_campaign(store)
    controller.run(stop=lambda: stopping, wait=wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
