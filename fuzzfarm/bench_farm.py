"""`fuzzfarm bench farm`: the distributed farm on this machine, measured side by side.

1. Total execs/s with 1 and with 2 workers (each run: a fresh Redis, N workers, the
   controller, one campaign on `seed` with N slices in flight), and their ratio.
2. Redis commands per 1,000 execs in steady state (Redis's own command counter, from when
   every worker has finished a slice and the first findings are triaged and minimized, to
   the end of the run; the whole run's figure is printed too), hence how many workers one
   Redis can serve.
3. Time from `fuzzfarm up` (a subprocess, as a user runs it) to a triaged and minimized bucket
   of the seed bug (segment 0's vaddr = the heap's first payload).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.local import LocalFarm, url_from_status
from workers.store import Campaign, FarmStore

ROOT = Path(__file__).parents[1]
SEED_BUG_FIELD = "segments[0].vaddr"
# a Redis serves well over 50,000 simple commands/s on one core; plan for a fifth of that
REDIS_BUDGET = 10_000


def _commands(store: FarmStore) -> int:
    return store.commands_processed()


def _backlog(store: FarmStore) -> int:
    """Triage and minimization not yet done (queued, or running)."""
    return (store.triage.backlog() + store.queue_length("triage")
            + store.queue_length("minimize")
            + sum(1 for b in store.buckets.all() if b.minimize_queued is not None))


def _campaign(store: FarmStore, cid: str) -> Campaign:
    campaign = store.campaigns.get(cid)
    if campaign is None:
        raise RuntimeError(f"campaign {cid} is gone from Redis")
    return campaign


def _run_farm(workers: int, seconds: float, slice_seconds: float, data: Path) -> dict[str, Any]:
    farm = LocalFarm(data=data, workers=workers, slice_seconds=slice_seconds,
                     extra_env={"FUZZFARM_CACHE": str(data / "cache")})
    store = farm.start()
    try:
        cmds_start = _commands(store)
        cid = farm.ensure_campaign(store)
        start = time.time()
        # steady state begins once every worker has finished one slice and the first burst
        # of findings is triaged and minimized (a new campaign finds most of its buckets in
        # its first minutes; a long-running one rarely finds a new one)
        while _campaign(store, cid).slices_done < workers or _backlog(store):
            time.sleep(2.0)
            if time.time() - start > seconds + 900:
                raise RuntimeError(f"the farm with {workers} worker(s) did not settle: triage "
                                   f"or minimization still busy after {seconds + 900:.0f} s")
        warmup = time.time() - start
        t0, execs0, cmds0 = time.time(), _campaign(store, cid).execs, _commands(store)
        while time.time() - t0 < seconds:
            time.sleep(1.0)
        store.campaigns.set_state(cid, "stopping")
        while any(s.state == "running"
                  for s in store.campaigns.slices(store.campaigns.inflight(cid))):
            time.sleep(0.5)
        t1, execs1, cmds1 = time.time(), _campaign(store, cid).execs, _commands(store)
        return {"execs": execs1 - execs0, "seconds": t1 - t0, "commands": cmds1 - cmds0,
                "rate": (execs1 - execs0) / (t1 - t0), "warmup": warmup,
                "all_execs": execs1, "all_commands": cmds1 - cmds_start}
    finally:
        farm.stop(None)


def _time_to_seed_bug(data: Path, workers: int, cap: float) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("REDIS_URL", None)
    err_path = data / "up.err"
    data.mkdir(parents=True, exist_ok=True)
    with err_path.open("w") as err:
        start = time.time()
        up = subprocess.Popen([sys.executable, "-m", "fuzzfarm.cli", "up", "--workers",
                               str(workers), "--data", str(data)],
                              stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
        try:
            store = None
            while time.time() - start < cap:
                time.sleep(0.5)
                if store is None:
                    url = url_from_status(err_path.read_text())
                    if url is None:
                        continue
                    store = FarmStore.connect(url, "bench")
                for b in store.buckets.all():
                    if not b.minimized:
                        continue
                    report = store.reports.get(b.reproducer, b.kernel) or {}
                    if any(f.get("field") == SEED_BUG_FIELD
                           for f in report.get("findings", [])):
                        return time.time() - start
            return float("inf")
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                up.kill()


def bench_farm(seconds: float, slice_seconds: float, repeats: int, cap: float) -> int:
    print(f"bench farm: campaigns on seed, {slice_seconds:.0f} s slices, {seconds:.0f} s "
          f"measured after every worker finished a slice, {repeats} repeat(s)", flush=True)
    # a worker that is still winding down may write into it while it is removed
    with tempfile.TemporaryDirectory(prefix="fuzzfarm-bench-farm-",
                                     ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(repeats):
            for workers in (1, 2):
                try:
                    out = _run_farm(workers, seconds, slice_seconds, root / f"w{workers}-{r}")
                except RuntimeError as e:  # the farm's own failure, said as such
                    print(f"fuzzfarm: error: {e}", file=sys.stderr)
                    return 1
                runs[workers].append(out)
                print(f"   {workers} worker(s): {out['rate']:,.0f} execs/s, "
                      f"{out['commands'] * 1000 / max(out['execs'], 1):.2f} Redis commands "
                      f"per 1,000 execs in steady state (after {out['warmup']:.0f} s of "
                      f"warm-up); whole run incl. warm-up "
                      f"{out['all_commands'] * 1000 / max(out['all_execs'], 1):.2f}",
                      flush=True)
        one = statistics.median(o["rate"] for o in runs[1])
        two = statistics.median(o["rate"] for o in runs[2])
        per_k = statistics.median(o["commands"] * 1000 / max(o["execs"], 1)
                                  for rs in runs.values() for o in rs)
        per_worker_cmds = per_k * two / 2 / 1000
        print(f"\n1. total execs/s (median): 1 worker {one:,.0f}, 2 workers {two:,.0f}, "
              f"ratio {two / one if one else float('inf'):.2f}x")
        print(f"2. Redis commands per 1,000 execs (median): {per_k:.2f}; one worker issues "
              f"~{per_worker_cmds:.1f} commands/s, so a Redis at {REDIS_BUDGET:,} commands/s "
              f"serves ~{REDIS_BUDGET / per_worker_cmds if per_worker_cmds else 0:,.0f} "
              f"workers")
        t = _time_to_seed_bug(root / "up", 2, cap)
        print(f"3. fuzzfarm up (2 workers) to a triaged and minimized bucket of the seed bug: "
              f"{t:.0f} s")
    return 0
