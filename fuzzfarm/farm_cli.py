"""The farm's commands: up, status, campaign, buckets, verify, kernel, controller, worker."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

EXIT_OK, EXIT_ERROR = 0, 2
DEFAULT_URL = "redis://127.0.0.1:6379/0"
# a table written to a pipe or file keeps one row per line, however long the signatures
PIPE_WIDTH = 4096
STATUS_EVERY_TTY, STATUS_EVERY_PIPE = 1.0, 10.0


class FarmUsageError(Exception):
    """A farm command that cannot run as asked (one line for the user)."""


def _url(args: argparse.Namespace) -> str:
    return args.redis_url or os.environ.get("REDIS_URL") or DEFAULT_URL


def _store(args: argparse.Namespace) -> Any:
    from workers.settings import redact_url
    from workers.store import FarmStore, StoreError

    url = _url(args)
    store = FarmStore.connect(url, "cli")
    try:
        store.ping()
    except StoreError as e:
        raise FarmUsageError(f"cannot reach Redis at {redact_url(url)} ({e}); is `fuzzfarm up` "
                             "running, or is --redis-url / REDIS_URL right?") from None
    return store


def _sender(args: argparse.Namespace) -> Any:
    """A Celery app that sends to the farm at --redis-url (tasks are sent by name)."""
    from workers.app import make_app
    from workers.settings import Settings

    return make_app(Settings(redis_url=_url(args)))


def _wait(until: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not until():
        if time.monotonic() > deadline:
            raise FarmUsageError(f"timed out after {seconds:.0f} s waiting for {what} "
                                 f"(are workers running?)")
        time.sleep(0.5)


class _Console(Console):
    """rich's own answer to a reader that went away is to point stdout at /dev/null and exit;
    here it is an error like any other write's, for the caller to deal with."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(32, "Broken pipe")


# up ------------------------------------------------------------------------------------------

class StatusOutput:
    """What `fuzzfarm up` tells the user on stderr: messages, and one status line redrawn in
    place on a terminal, or written as a plain line every 10 s to a pipe or file. A stderr that
    went away (a closed terminal or pipe) is no reason to stop: the farm must still be stopped
    in order, so output then goes nowhere."""

    def __init__(self, stream: TextIO | None) -> None:
        self.console = _Console(file=stream, markup=False, emoji=False, highlight=False,
                                soft_wrap=True)
        self.live: Live | None = None
        self.gone = stream is None
        self.every = STATUS_EVERY_TTY if self.console.is_terminal else STATUS_EVERY_PIPE

    def _write(self, write: Callable[[], object]) -> None:
        if self.gone:
            return
        try:
            write()
        except (OSError, ValueError):  # EPIPE, EIO, or a closed file
            self.gone = True

    def say(self, line: str) -> None:
        self._write(lambda: self.console.print(f"fuzzfarm: {line}"))

    def status(self, line: str) -> None:
        if not self.console.is_terminal:
            self._write(lambda: self.console.print(line))
            return

        def redraw() -> None:
            if self.live is None:
                # no refresh thread: the line is drawn only here, where a failure is caught
                self.live = Live(Text(line), console=self.console, auto_refresh=False,
                                 redirect_stdout=False, redirect_stderr=False)
                self.live.start()
            self.live.update(Text(line), refresh=True)

        self._write(redraw)

    def end_status(self) -> None:
        """Leave the last status line as it is; what follows goes below it."""
        live, self.live = self.live, None
        if live is not None:
            self._write(live.stop)


def cmd_up(args: argparse.Namespace) -> int:
    from workers.local import ExecRate, FarmError, LocalFarm, status_line
    from workers.settings import Settings

    if args.workers < 1:
        raise FarmUsageError("--workers must be at least 1")
    if args.first_slice_seconds < 0:
        raise FarmUsageError("--first-slice-seconds must be positive or 0")
    Settings.from_env()  # a setting that cannot be read stops `up` before anything starts
    farm = LocalFarm(data=Path(args.data), workers=args.workers, kernel=args.kernel,
                     redis_url=args.redis_url or os.environ.get("REDIS_URL"),
                     slice_seconds=args.slice_seconds,
                     first_slice_seconds=args.first_slice_seconds, dashboard_port=args.port)
    store = None
    started = time.monotonic()
    stopped_by: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        # SIGTERM (kill, timeout, systemd, docker stop) and SIGHUP (the terminal closed) stop
        # the farm as Ctrl-C does; a second one during the stop sequence stops it at once
        stopped_by.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    out = StatusOutput(sys.stderr)
    rate = ExecRate()
    try:
        try:
            store = farm.start(out.say)
            _check_kernel(store, args.kernel)
            cid = farm.ensure_campaign(store)
            out.say(f"campaign {cid} on {args.kernel}; logs in {farm.data / 'logs'}")
            farm.wait_ready(store, out.say)
        except FarmError as e:
            raise FarmUsageError(str(e)) from None
        if farm.dashboard_port is not None:
            out.say(f"dashboard: http://127.0.0.1:{farm.dashboard_port}/")
        out.say(f"in another shell: REDIS_URL={farm.url_for_shell()} fuzzfarm status; Ctrl-C "
                "stops the farm")
        last = 0.0
        while args.seconds is None or time.monotonic() - started < args.seconds:
            time.sleep(1.0)
            dead = farm.dead()
            if dead:
                raise FarmUsageError(f"farm process(es) exited: {', '.join(dead)} "
                                     f"(see {farm.data / 'logs'})")
            if time.monotonic() - last >= out.every:
                last = time.monotonic()
                out.status(status_line(store, started, rate))
    except KeyboardInterrupt:
        if not stopped_by:
            stopped_by.append(signal.SIGINT)
    finally:
        out.end_status()
        if store is not None or farm.procs:
            why = f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""
            out.say(f"stopping{why}: campaigns first (running slices report), then workers, "
                    "controller and Redis; Ctrl-C again to stop at once")
            try:
                farm.stop(store, out.say)
            except KeyboardInterrupt:
                out.say("stopping at once")
                farm.kill_all(store)
    return 128 + stopped_by[0] if stopped_by else EXIT_OK


def _check_kernel(store: Any, kernel: str) -> None:
    known = store.kernels.names()
    if kernel not in known:
        raise FarmUsageError(f"unknown kernel build '{kernel}': known are "
                             f"{', '.join(known)} (fuzzfarm kernel add PROFILE.toml)")


# status, campaigns, buckets -----------------------------------------------------------------

def _stdout() -> Console:
    """Tables for a terminal fit its width; written to a pipe or a file, one row per line. A
    closed pipe ends the command as a print's would (`fuzzfarm.cli.main`)."""
    console = _Console(markup=False, emoji=False, highlight=False)
    if not console.is_terminal:
        console = _Console(markup=False, emoji=False, highlight=False, width=PIPE_WIDTH)
    return console


def cmd_status(args: argparse.Namespace) -> int:
    from workers.settings import redact_url

    store = _store(args)
    campaigns = store.campaigns.all()
    buckets = store.buckets.all()
    workers = store.stats.workers()
    counters = store.stats.counters()
    kernels = store.kernels.names()
    if args.json:
        info = {"redis": redact_url(_url(args)), "campaigns": [c.to_json() for c in campaigns],
                "workers": {k: w.to_json() for k, w in workers.items()},
                "buckets": len(buckets), "counters": counters, "kernels": kernels}
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    out = _stdout()
    out.print(f"Redis {redact_url(_url(args))} · kernels: {', '.join(kernels) or 'none'}")
    out.print(f"workers seen in the last 2 minutes: {len(workers)}")
    if campaigns:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name, justify in (("campaign", "left"), ("state", "left"), ("kernel", "left"),
                              ("execs", "right"), ("edges", "right"),
                              ("slices done", "right"), ("in flight", "right")):
            table.add_column(name, justify=justify)
        for c in campaigns:
            table.add_row(c.id, c.state, c.kernel, f"{c.execs:,}", str(c.edges),
                          str(c.slices_done), str(len(store.campaigns.inflight(c.id))))
        out.print(table)
    classes = Counter(b.crash_class for b in buckets)
    out.print(f"buckets: {len(buckets)}")
    if classes:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("class")
        table.add_column("buckets", justify="right")
        for cls, n in sorted(classes.items()):
            table.add_row(cls, str(n))
        out.print(table)
    if counters.get("harness_errors"):
        out.print(f"harness errors: {counters['harness_errors']} (not findings)")
    return EXIT_OK


def cmd_campaign(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "start":
        from workers.kernels import ensure_builtin

        ensure_builtin(store)
        _check_kernel(store, args.kernel)
        if args.slices < 1 or args.slice_seconds <= 0 or args.first_slice_seconds < 0:
            raise FarmUsageError("--slices must be >= 1, --slice-seconds positive and "
                                 "--first-slice-seconds positive or 0")
        cid = store.campaigns.create(args.kernel, args.slices, args.slice_seconds,
                                     args.first_slice_seconds)
        print(cid)
        return EXIT_OK
    running = [c for c in store.campaigns.all() if c.state == "running"]
    targets = [c for c in running if args.id in (None, c.id)]
    if args.id and not targets:
        raise FarmUsageError(f"no running campaign {args.id}")
    for c in targets:
        store.campaigns.set_state(c.id, "stopping")
        print(f"stopping {c.id}")
    return EXIT_OK


def cmd_buckets(args: argparse.Namespace) -> int:
    if args.action == "merge":
        return _merge_buckets(args)
    if args.action == "split":
        return _split_buckets(args)
    if args.ids:
        raise FarmUsageError("`fuzzfarm buckets` lists; to merge or split: `fuzzfarm buckets "
                             "merge INTO OTHER...`, `fuzzfarm buckets split BUCKET INPUT... "
                             "--name NAME`")
    store = _store(args)
    if args.log:
        log = store.buckets.review_log()
        if args.json:
            print(json.dumps(log, indent=2, sort_keys=True))
        for entry in [] if args.json else log:
            print(f"{entry['action']:5}  {entry['from']} -> {entry['into']}  "
                  f"{entry['signature']}")
        if not log and not args.json:
            print("no merges or splits")
        return EXIT_OK
    buckets = [b for b in store.buckets.all() if args.cls in (None, b.crash_class)]
    if args.json:
        print(json.dumps([b.to_json() for b in buckets], indent=2, sort_keys=True))
        return EXIT_OK
    if not buckets:
        print("no buckets")
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("bucket", "left"), ("class", "left"), ("count", "right"),
                          ("repro", "right"), ("min", "right"), ("verify", "left"),
                          ("signature", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for b in buckets:
        verify = ",".join(f"{k}:{v.get('state')}" for k, v in sorted(b.verify.items())) or "-"
        table.add_row(b.id, b.crash_class, str(b.count), str(b.reproducer_size),
                      str(b.minimized_size or "-"), verify, b.signature)
    _stdout().print(table)
    return EXIT_OK


def _merge_buckets(args: argparse.Namespace) -> int:
    if len(args.ids) < 2:
        raise FarmUsageError("buckets merge needs the bucket to keep, then one or more to "
                             "merge into it")
    store = _store(args)
    into, *others = args.ids
    try:
        merged = store.buckets.merge(into, others)
    except KeyError as e:
        raise FarmUsageError(f"no bucket {e.args[0]} (see `fuzzfarm buckets`)") from None
    print(f"merged {len(set(others) - {into})} bucket(s) into {merged.id}: {merged.count} "
          f"inputs, reproducer {merged.reproducer_size} bytes, signature {merged.signature}")
    return EXIT_OK


def _split_buckets(args: argparse.Namespace) -> int:
    if len(args.ids) < 2 or not args.name:
        raise FarmUsageError("buckets split needs the bucket, then the inputs (sha256) that "
                             "are another bug, and --name for it")
    store = _store(args)
    bid, *shas = args.ids
    counted = store.buckets.counted_inputs(bid)
    if not counted:
        raise FarmUsageError(f"no bucket {bid} with inputs (see `fuzzfarm buckets`)")
    sizes = {sha: len(data) for sha, data in zip(sorted(counted),
                                                  store.blobs.get_many(sorted(counted)),
                                                  strict=True) if data is not None}
    lost = sorted(counted - set(sizes))
    if lost:
        raise FarmUsageError(f"the farm no longer holds input(s) {', '.join(lost[:3])}")
    from fuzz.solutions import bucket_id
    try:
        made = store.buckets.split(bid, shas, args.name, sizes, bucket_id)
    except (KeyError, ValueError) as e:
        raise FarmUsageError(str(e)) from None
    print(f"split {made.count} input(s) of {bid} into {made.id}: {made.signature}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from workers.kernels import ensure_builtin

    store = _store(args)
    ensure_builtin(store)
    _check_kernel(store, args.kernel)
    buckets = store.buckets.all()
    if not buckets:
        print("no buckets to verify")
        return EXIT_OK
    started = time.time()
    app = _sender(args)
    for b in buckets:
        app.send_task("workers.tasks.verify", args=[b.id, args.kernel])

    def verified_since(bid: str) -> bool:
        bucket = store.buckets.get(bid)
        state = bucket.verify.get(args.kernel) if bucket is not None else None
        return bucket is None or float((state or {}).get("time", 0)) >= started

    def done() -> bool:
        return all(verified_since(b.id) for b in buckets)

    _wait(done, args.wait, f"{len(buckets)} verifications on {args.kernel}")
    counts: dict[str, int] = {}
    for b in buckets:
        state = store.buckets.get(b.id).verify[args.kernel]["state"]
        counts[state] = counts.get(state, 0) + 1
        print(f"{b.id}  {state:<10}  {b.signature}")
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" on {args.kernel}")
    return EXIT_OK


def minimize_bucket(args: argparse.Namespace) -> int:
    store = _store(args)
    bucket = store.buckets.get(args.bucket)
    if bucket is None:
        raise FarmUsageError(f"no bucket {args.bucket} (see fuzzfarm buckets)")
    before = bucket.minimized_size
    started = time.time()
    _sender(args).send_task("workers.tasks.minimize", args=[bucket.id])

    def done() -> bool:
        b = store.buckets.get(bucket.id)
        return b is not None and (b.minimized_size != before
                                  or (b.minimize_done or 0.0) >= started)

    _wait(done, args.wait, f"the minimization of bucket {bucket.id}")
    b = store.buckets.get(bucket.id)
    print(f"bucket {b.id}: reproducer {b.reproducer_size} bytes, minimized "
          f"{b.minimized_size} bytes ({b.minimized}); signature: {b.signature}")
    return EXIT_OK


# kernels ---------------------------------------------------------------------------------------

def cmd_kernel(args: argparse.Namespace) -> int:
    from workers.kernels import add_kernel, ensure_builtin

    if args.action == "init":
        return _kernel_init(args)
    store = _store(args)
    ensure_builtin(store)
    if args.action == "add":
        if not args.profile:
            raise FarmUsageError("kernel add needs a PROFILE.toml")
        name = add_kernel(store, Path(args.profile), args.name, args.sha256)
        entry = store.kernels.get(name)
        print(f"added kernel build '{name}' (image sha256 {entry.image if entry else '?'})")
        return EXIT_OK
    for name in store.kernels.names():
        entry = store.kernels.get(name)
        image, about = (entry.image, entry.description) if entry else ("?", "")
        print(f"{name:<16} image {image[:16]}  {about}")
    return EXIT_OK


def _kernel_init(args: argparse.Namespace) -> int:
    """Draft a profile from an image's symbols; no farm needed."""
    from kernel_emu.draft import draft_profile
    from kernel_emu.errors import ImageError

    if not args.profile:
        raise FarmUsageError("kernel init needs the kernel IMAGE (an ELF, or a UEFI "
                             "application with its link map beside it)")
    image = Path(args.profile)
    try:
        draft = draft_profile(image, args.name)
    except ImageError as e:
        raise FarmUsageError(str(e)) from None
    out = Path(args.out) if args.out else image.with_suffix(".toml")
    if out.exists() and not args.force:
        raise FarmUsageError(f"{out} exists: give another --out, or --force to replace it")
    text = draft.text.replace(f'image = "{image.name}"',
                              f'image = "{os.path.relpath(image.resolve(), out.resolve().parent)}"')
    try:
        out.write_text(text)
    except OSError as e:
        raise FarmUsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"wrote {out}")
    for key, symbol in draft.found.items():
        print(f"  found     {key:<26} {symbol}")
    for what in draft.missing:
        print(f"  fill in   {what}")
    print(f"then: fuzzfarm boot --kernel {out} --check")
    return EXIT_OK


# processes for docker-compose and by hand -----------------------------------------------------

def cmd_controller(args: argparse.Namespace) -> int:
    from workers.controller import main

    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    return main()


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.__main__ import main

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.redis_url:
        argv += ["--redis-url", args.redis_url]
    return main(argv)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.local import worker_command

    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    cmd = worker_command(args.name, args.queues)
    os.execv(cmd[0], cmd)  # the worker replaces this process (signals go straight to it)
    return EXIT_ERROR


def add_parsers(sub: Any) -> None:
    def redis_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", default=None, metavar="URL",
                       help=f"the farm's Redis (default: $REDIS_URL or {DEFAULT_URL})")

    def first_slice_opt(p: argparse.ArgumentParser) -> None:
        from workers.settings import Settings

        first = Settings.first_slice_seconds
        p.add_argument("--first-slice-seconds", type=float, default=first, metavar="S",
                       help=f"a new campaign's first slices last this long, so that its first "
                            f"findings are triaged soon after the start (default: {first:.0f}; "
                            f"0: as long as the others)")

    p = sub.add_parser("up", help="run the whole farm locally (Redis, workers, controller)",
                       description="Start the farm on this machine: a Redis server (unless "
                                   "--redis-url/REDIS_URL names one), N Celery workers, the "
                                   "controller and the dashboard, and a campaign on the kernel "
                                   "build. Ctrl-C stops everything in order, losing nothing.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes (default: one per CPU)")
    p.add_argument("--port", type=int, default=None, metavar="P",
                   help="serve the dashboard on 127.0.0.1:P")
    p.add_argument("--kernel", default="seed", help="kernel build to fuzz (default: seed)")
    p.add_argument("--slice-seconds", type=float, default=60.0, metavar="S",
                   help="length of one fuzzing task (default: 60)")
    first_slice_opt(p)
    p.add_argument("--data", default="out/farm", metavar="DIR",
                   help="Redis data (AOF), logs and caches (default: out/farm)")
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    redis_opt(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="campaigns, workers and findings of the farm",
                       description="Show the farm's campaigns, live workers and buckets.")
    p.add_argument("--json", action="store_true")
    redis_opt(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("campaign", help="start or stop a campaign",
                       description="start: fuzz a kernel build with N slices in flight. "
                                   "stop: stop one campaign (or all running ones).")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("id", nargs="?", default=None, help="campaign to stop (default: all)")
    p.add_argument("--kernel", default="seed")
    p.add_argument("--slices", type=int, default=2, help="slices in flight (default: 2)")
    p.add_argument("--slice-seconds", type=float, default=60.0)
    first_slice_opt(p)
    redis_opt(p)
    p.set_defaults(func=cmd_campaign)

    p = sub.add_parser("buckets", help="list, merge or split the farm's buckets",
                       description="Without an action: one line per bucket (class, count, "
                                   "reproducer and minimized sizes, verification per kernel "
                                   "build, signature). `merge INTO OTHER...`: the other "
                                   "buckets are the same bug as INTO; their inputs move there "
                                   "and their later inputs follow. `split BUCKET INPUT... "
                                   "--name NAME`: those inputs (sha256) are another bug; they "
                                   "move to a new bucket. Both are logged (--log).")
    p.add_argument("action", nargs="?", choices=("list", "merge", "split"), default="list",
                   help="list (default), merge or split")
    p.add_argument("ids", nargs="*", help="merge: buckets; split: a bucket, then inputs")
    p.add_argument("--name", default=None, help="split: what the new bucket's bug is called")
    p.add_argument("--log", action="store_true", help="the merges and splits made so far")
    p.add_argument("--json", action="store_true")
    p.add_argument("--class", dest="cls", default=None, help="only this crash class")
    redis_opt(p)
    p.set_defaults(func=cmd_buckets)

    p = sub.add_parser("verify", help="re-run every bucket on another kernel build",
                       description="Boot every bucket's reproducer on KERNEL and record "
                                   "'reproduces' or 'fixed' per bucket.")
    p.add_argument("--kernel", required=True)
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the results")
    redis_opt(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("kernel", help="add, list or draft kernel builds",
                       description="add: upload a profile and its image so every worker boots "
                                   "the same bytes. list: the builds the farm knows. init: draft "
                                   "a profile for a kernel image from its symbols (no farm "
                                   "needed), to check with `fuzzfarm boot --check`.")
    p.add_argument("action", choices=["add", "list", "init"])
    p.add_argument("profile", nargs="?", metavar="PROFILE.toml|IMAGE",
                   help="add: the profile; init: the kernel image")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="init: where to write the draft (default: the image's name, .toml)")
    p.add_argument("--force", action="store_true", help="init: replace an existing --out")
    p.add_argument("--name", default=None, help="build name (default: the profile's name)")
    p.add_argument("--sha256", default=None, metavar="HEX",
                   help="with add: the sha256 the image must have (your build's), checked "
                        "before it is uploaded")
    redis_opt(p)
    p.set_defaults(func=cmd_kernel)

    p = sub.add_parser("controller", help="run the farm's controller (one per farm)",
                       description="Keep campaigns going: slices in flight, lost work resent.")
    redis_opt(p)
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("dashboard", help="serve the findings dashboard",
                       description="Serve the dashboard (overview, buckets, coverage) from the "
                                   "farm's Redis. Binds 127.0.0.1 unless told otherwise; "
                                   "beyond localhost FUZZFARM_DASHBOARD_TOKEN must be set.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    redis_opt(p)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("worker", help="run one Celery worker of the farm",
                       description="A Celery worker consuming the fuzz, triage, minimize and "
                                   "coverage queues, and the crosscheck queue where QEMU and "
                                   "OVMF are installed (one task at a time).")
    p.add_argument("--name", default="worker", help="worker name (default: worker)")
    p.add_argument("--queues", default=None,
                   help="comma-separated queues to consume (default: fuzz, triage, "
                        "minimize, coverage, and crosscheck where QEMU + OVMF are installed)")
    redis_opt(p)
    p.set_defaults(func=cmd_worker)
