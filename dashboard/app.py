"""The findings dashboard: a Flask app over the farm's Redis (read through FarmStore).

Pages: overview, buckets, one bucket's report, coverage of a kernel build. Parts that change
are fragments polled with htmx. Everything the kernel printed and everything an ELF contains
is untrusted and only ever reaches a page through Jinja2's autoescaping.

State-changing requests (minimize again, verify, crosscheck, sample coverage) are POSTs
carrying a token and only send a task to the workers (marking it queued where a page shows
that):
FUZZFARM_DASHBOARD_TOKEN when it is set (it must be, beyond localhost), else a token made for
this process and put in the forms. Reading can be guarded too (`dashboard/access.py`).
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from jinja2 import Undefined, select_autoescape

from dashboard import charts, coverage, kernelinfo, metrics, report
from dashboard.access import COOKIE, OPEN_ENDPOINTS, ReadAccess, local_path, without_token
from kernel_emu.errors import HarnessError
from workers.kernels import NAME
from workers.settings import Settings
from workers.store import Bucket, FarmStore, StoreError

TOKEN_ENV = "FUZZFARM_DASHBOARD_TOKEN"
TOKEN_HEADER = "X-Fuzzfarm-Token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BUCKET_ID = re.compile(r"[0-9a-f]{8,64}\Z")
POLL = "every 5s"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
NOTICES = {
    "minimize": "Minimization sent to the workers.",
    "verify": "Verification sent to the workers.",
    "crosscheck": "Crosscheck sent to the workers (only those with QEMU + OVMF take it).",
    "sample": "Coverage sample sent to the workers.",
    "sample-busy": "A coverage sample of this build is already queued or running.",
}
SendTask = Callable[[str, list[Any]], None]


@dataclass
class Config:
    redis_url: str
    cache_dir: Path
    token: str | None  # FUZZFARM_DASHBOARD_TOKEN
    local: bool
    coverage_sample: int
    csrf: str
    access: ReadAccess


def _celery_sender(redis_url: str) -> SendTask:
    lock = threading.Lock()
    holder: list[Any] = []

    def send(name: str, args: list[Any]) -> None:
        with lock:
            if not holder:
                from workers.app import make_app

                holder.append(make_app(Settings(redis_url=redis_url)))
        # bounded retries: a request must not hang on a broker that is down
        holder[0].send_task(name, args=args, retry=True,
                            retry_policy={"max_retries": 3, "interval_start": 0,
                                          "interval_step": 0.5, "interval_max": 1})

    return send


# answered with a plain 401 rather than the login page: what programs fetch
PLAIN_ENDPOINTS = frozenset({"metrics_page", "download_elf", "download_report"})


def create_app(redis_url: str | None = None, *, token: str | None = None, local: bool = True,
               cache_dir: Path | None = None, coverage_sample: int = coverage.DEFAULT_SAMPLE,
               send_task: SendTask | None = None, read_token: str | None = None,
               trust_header: str | None = None) -> Flask:
    """The dashboard; `read_token` and `trust_header` guard reading (`dashboard.access`)."""
    settings = Settings.from_env()
    url = redis_url or settings.redis_url
    access = ReadAccess(read_token or None, trust_header or None, token or None)
    cfg = Config(url, cache_dir or settings.cache_dir, token or None, local, coverage_sample,
                 secrets.token_urlsafe(32), access)
    store = FarmStore.connect(url, "dashboard")
    send = send_task or _celery_sender(url)
    app = Flask(__name__)
    # every template, whatever its extension, and strings rendered from code
    app.jinja_env.autoescape = select_autoescape(default=True, default_for_string=True)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["fuzzfarm"] = {"config": cfg, "store": store}
    _filters(app)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"cfg": cfg, "poll": POLL, "notice": NOTICES.get(request.args.get("notice", ""))}

    @app.before_request
    def _host_check() -> Response | None:
        # a page on localhost can still be read through DNS rebinding: answer only to the
        # names a browser uses for this machine
        if cfg.local and _hostname(request.host) not in LOCAL_HOSTS:
            return Response("unknown Host\n", 400, mimetype="text/plain")
        return None

    @app.before_request
    def _read_check() -> Response | tuple[str, int] | None:
        g.reader = None
        if not access.guarded or request.endpoint in OPEN_ENDPOINTS:
            return None
        g.reader = access.reader(request)
        if g.reader is not None:
            return None
        if request.method == "GET" and access.token_ok(request.args.get("token")):
            # the token leaves the address bar (and the history) at once: the cookie stands
            # for it from here on
            return _signed_in(redirect(without_token(request), 303))
        if request.headers.get("HX-Request"):
            # a polled fragment of a page whose session ended: htmx sends the browser to log in
            current = urlsplit(request.headers.get("HX-Current-URL", "/"))
            page = local_path(current.path + (f"?{current.query}" if current.query else ""))
            resp = Response("sign in again\n", 401, mimetype="text/plain")
            resp.headers["HX-Redirect"] = url_for("login", next=page)
            return resp
        if request.method != "GET" or request.endpoint in PLAIN_ENDPOINTS:
            resp = Response("authentication required\n", 401, mimetype="text/plain")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="fuzzfarm dashboard"'
            return resp
        return render_template("login.html", next=without_token(request), wrong=False), 401

    def _signed_in(resp: Response) -> Response:
        resp.set_cookie(COOKIE, access.cookie_value(), httponly=True, samesite="Lax",
                        secure=request.is_secure, path="/")
        return resp

    @app.errorhandler(HarnessError)
    def _harness_error(e: Exception) -> tuple[str, int]:
        # the dashboard's own failure (its cache folder, say): said on the page, no traceback
        return render_template("error.html", message=str(e)), 500

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(StoreError)
    def _redis_down(e: Exception) -> tuple[str, int]:
        return render_template("error.html", message=f"Redis is unreachable: {e}"), 503

    def check_token() -> None:
        given = request.form.get("token") or request.headers.get(TOKEN_HEADER) or ""
        expected = cfg.token or cfg.csrf
        if not hmac.compare_digest(given.encode(), expected.encode()):
            abort(403, description="missing or wrong dashboard token")

    # reading: the login form (only with a read token) -----------------------------------------
    @app.route("/login", methods=["GET", "POST"])
    def login() -> Response | tuple[str, int] | str:
        target = local_path(request.values.get("next"))
        if not access.read_token:
            return redirect(target, 303)  # nothing to sign in with: open, or the proxy's job
        if request.method == "POST":
            if access.token_ok(request.form.get("token")):
                return _signed_in(redirect(target, 303))
            return render_template("login.html", next=target, wrong=True), 401
        return render_template("login.html", next=target, wrong=False)

    @app.get("/logout")
    def logout() -> Response:
        resp = redirect(url_for("login"), 303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # health and metrics ---------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        try:
            store.ping()
        except StoreError as e:
            return jsonify({"redis": "down", "error": str(e)}), 503
        return jsonify({"redis": "ok"}), 200

    @app.get("/metrics")
    def metrics_page() -> Response:
        body, content_type = metrics.render(store)
        return Response(body, content_type=content_type)

    # overview -------------------------------------------------------------------------------
    @app.get("/")
    def overview() -> str:
        return render_template("overview.html", **_overview(store, request.args.get("campaign")))

    @app.get("/fragment/overview")
    def overview_fragment() -> str:
        return render_template("_overview_live.html",
                               **_overview(store, request.args.get("campaign")))

    # buckets --------------------------------------------------------------------------------
    @app.get("/buckets")
    def buckets_page() -> str:
        return render_template("buckets.html", **_buckets(store, request.args))

    @app.get("/fragment/buckets")
    def buckets_fragment() -> str:
        return render_template("_buckets_table.html", **_buckets(store, request.args))

    @app.get("/bucket/<bid>")
    def bucket_page(bid: str) -> str:
        bucket = _bucket_or_404(store, bid)
        return render_template("bucket.html",
                               **_bucket_view(store, cfg, bucket, request.args))

    @app.get("/fragment/bucket/<bid>/status")
    def bucket_status(bid: str) -> str:
        bucket = _bucket_or_404(store, bid)
        return render_template("_bucket_status.html", b=bucket)

    @app.post("/bucket/<bid>/minimize")
    def minimize(bid: str) -> Response:
        check_token()
        bucket = _bucket_or_404(store, bid)
        send("workers.tasks.minimize", [bucket.id])
        return redirect(url_for("bucket_page", bid=bucket.id, notice="minimize"), 303)

    @app.post("/bucket/<bid>/verify")
    def verify(bid: str) -> Response:
        check_token()
        bucket = _bucket_or_404(store, bid)
        kernel = request.form.get("kernel", "")
        if not NAME.match(kernel) or kernel not in store.kernels.names():
            abort(400, description="unknown kernel build")
        send("workers.tasks.verify", [bucket.id, kernel])
        return redirect(url_for("bucket_page", bid=bucket.id, notice="verify"), 303)

    @app.post("/bucket/<bid>/crosscheck")
    def crosscheck(bid: str) -> Response:
        check_token()
        bucket = _bucket_or_404(store, bid)
        store.buckets.queue_crosscheck(bucket.id, bucket.minimized or bucket.reproducer,
                                       again=True)
        send("workers.tasks.crosscheck", [bucket.id])
        return redirect(url_for("bucket_page", bid=bucket.id, notice="crosscheck"), 303)

    # downloads: only a bucket's inputs and their reports, by sha256 --------------------------
    @app.get("/download/<sha>.elf")
    def download_elf(sha: str) -> Response:
        if not kernelinfo.SHA256.match(sha) or sha not in store.buckets.inputs():
            abort(404)
        data = store.blobs.get(sha)
        if data is None:
            abort(404)
        return Response(data, mimetype="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{sha}.elf"'})

    @app.get("/download/<sha>.json")
    def download_report(sha: str) -> Response:
        kernel = request.args.get("kernel", "")
        if not kernelinfo.SHA256.match(sha) or not NAME.match(kernel) or \
                sha not in store.buckets.inputs():
            abort(404)
        rep = store.reports.get(sha, kernel)
        if rep is None:
            abort(404)
        return Response(json.dumps(rep, indent=1, sort_keys=True), mimetype="application/json",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{sha}.{kernel}.json"'})

    # coverage -------------------------------------------------------------------------------
    @app.get("/coverage")
    def coverage_index() -> str:
        rows = []
        for k in store.kernels.names():
            rows.append({"kernel": k, "record": store.coverage.record(k),
                         "job": store.coverage.job(k), "corpus": store.corpus.size(k)})
        return render_template("coverage_index.html", rows=rows)

    @app.get("/coverage/<kernel>")
    def coverage_page(kernel: str) -> str:
        _kernel_or_404(store, kernel)
        return render_template("coverage.html",
                               **_coverage_view(store, cfg, kernel, request.args))

    @app.get("/coverage/<kernel>/fn/<addr>")
    def coverage_function(kernel: str, addr: str) -> str:
        _kernel_or_404(store, kernel)
        return render_template("coverage_fn.html",
                               **_coverage_function(store, cfg, kernel, addr))

    @app.get("/fragment/coverage/<kernel>/job")
    def coverage_job(kernel: str) -> str:
        _kernel_or_404(store, kernel)
        return render_template("_coverage_job.html", kernel=kernel,
                               job=store.coverage.job(kernel))

    @app.post("/coverage/<kernel>/sample")
    def coverage_sample(kernel: str) -> Response:
        check_token()
        _kernel_or_404(store, kernel)
        started = _send_sample(store, cfg, send, kernel)
        return redirect(url_for("coverage_page", kernel=kernel,
                                notice="sample" if started else "sample-busy"), 303)

    return app


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# template filters ---------------------------------------------------------------------------------

def _filters(app: Flask) -> None:
    def when(t: Any) -> str:
        if isinstance(t, Undefined) or t is None:
            return "—"
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t)))
        except (TypeError, ValueError, OverflowError):
            return "—"

    def ago(t: Any) -> str:
        if isinstance(t, Undefined) or t is None:
            return "—"
        try:
            s = max(0.0, time.time() - float(t))
        except (TypeError, ValueError):
            return "—"
        if s < 90:
            return f"{s:.0f} s ago"
        if s < 5400:
            return f"{s / 60:.0f} min ago"
        if s < 172800:
            return f"{s / 3600:.1f} h ago"
        return f"{s / 86400:.0f} days ago"

    def size(n: Any) -> str:
        if not isinstance(n, int):
            return "—"
        return f"{n} B" if n < 10240 else f"{n / 1024:.1f} KiB"

    def hexa(n: Any) -> str:
        return f"{n:#x}" if isinstance(n, int) else "—"

    app.jinja_env.filters.update(when=when, ago=ago, size=size, hex=hexa,
                                 num=lambda n: f"{int(n):,}" if str(n).isdigit() else str(n),
                                 human=charts.human)


# view data ----------------------------------------------------------------------------------------

def _bucket_or_404(store: FarmStore, bid: str) -> Bucket:
    bucket = store.buckets.get(bid) if BUCKET_ID.match(bid) else None
    if bucket is None:
        abort(404)
    return bucket


def _kernel_or_404(store: FarmStore, kernel: str) -> None:
    if not NAME.match(kernel) or store.kernels.get(kernel) is None:
        abort(404)


def _overview(store: FarmStore, selected: str | None) -> dict[str, Any]:
    campaigns = list(reversed(store.campaigns.all()))
    chosen = next((c for c in campaigns if c.id == selected), None) or next(
        (c for c in campaigns if c.state in ("running", "stopping")), None) or (
        campaigns[0] if campaigns else None)
    series = store.stats.series(chosen.id) if chosen else []
    latest = series[-1] if series else {}
    buckets = store.buckets.all()
    kernels = store.kernels.names()
    return {
        "campaigns": campaigns, "chosen": chosen, "latest": latest,
        "charts": [charts.line_chart("executions per second", series, "execs_per_second"),
                   charts.line_chart("edges covered", series, "edges", integer=True),
                   charts.line_chart("corpus size", series, "corpus", integer=True),
                   charts.line_chart("buckets", series, "buckets", integer=True)],
        "workers": store.stats.workers(), "by_class": sorted(Counter(
            b.crash_class for b in buckets).items(), key=lambda kv: (-kv[1], kv[0])),
        "bucket_total": len(buckets), "inputs_total": sum(b.count for b in buckets),
        "minimized": sum(1 for b in buckets if b.minimized),
        "corpus": [(k, store.corpus.size(k)) for k in kernels],
        "backlog": store.triage.backlog(), "counters": store.stats.counters(),
        "errors": store.stats.harness_errors(5),
    }


BUCKET_SORTS: dict[str, Callable[[Bucket], Any]] = {
    "class": lambda b: b.crash_class, "signature": lambda b: b.signature,
    "count": lambda b: b.count, "first_seen": lambda b: b.first_seen,
    "last_seen": lambda b: b.last_seen, "kernel": lambda b: b.kernel,
    "size": lambda b: b.reproducer_size,
    "minimized_size": lambda b: b.minimized_size if b.minimized_size is not None else 1 << 62,
}


def _buckets(store: FarmStore, args: Any) -> dict[str, Any]:
    sort = args.get("sort", "last_seen")
    sort = sort if sort in BUCKET_SORTS else "last_seen"
    order = "asc" if args.get("order") == "asc" else "desc"
    cls = args.get("class", "")
    kernel = args.get("kernel", "")
    q = args.get("q", "").strip()
    every = store.buckets.all()
    rows = [b for b in every if (not cls or b.crash_class == cls)
            and (not kernel or b.kernel == kernel or kernel in b.verify)
            and (not q or q.lower() in b.signature.lower() or b.id.startswith(q.lower()))]
    rows.sort(key=BUCKET_SORTS[sort], reverse=order == "desc")
    params = {k: v for k, v in (("sort", sort), ("order", order), ("class", cls),
                                ("kernel", kernel), ("q", q)) if v}
    return {"rows": rows, "total": len(every), "sort": sort, "order": order, "cls": cls,
            "kernel": kernel, "q": q, "params": params,
            "classes": sorted({b.crash_class for b in every}), "kernels": store.kernels.names()}


def _symbolize(image: Any, frames: list[str], image_sha: str,
               first_is_pc: bool = True) -> list[dict[str, Any]]:
    out = []
    table = kernelinfo.image_lines(image) if image is not None else None
    for i, frame in enumerate(frames):
        addr = kernelinfo.frame_address(image, frame) if image is not None else None
        line = None
        if addr is not None and table is not None:
            # a return address is the instruction after the call
            line = table.lookup(addr if i == 0 and first_is_pc else addr - 1)
        out.append({"frame": frame, "addr": addr, "line": line,
                    "source": kernelinfo.source_text(image_sha, line)})
    return out


def _bucket_view(store: FarmStore, cfg: Config, bucket: Bucket, args: Any) -> dict[str, Any]:
    which = args.get("input")
    if which not in ("minimized", "original"):
        which = "minimized" if bucket.minimized else "original"
    sha = bucket.minimized if which == "minimized" and bucket.minimized else bucket.reproducer
    which = "minimized" if sha == bucket.minimized else "original"
    kernels = store.kernels.names()
    kernel = args.get("kernel", bucket.kernel)
    if kernel not in kernels:
        kernel = bucket.kernel
    rep = store.reports.get(sha, kernel) if sha else None
    data = store.blobs.get(sha) if sha else None
    view: dict[str, Any] = {
        "b": bucket, "which": which, "sha": sha, "kernel": kernel, "kernels": kernels,
        "report": rep, "samples": store.buckets.samples(bucket.id),
        "has_report": {k: store.reports.exists(sha, k) for k in kernels} if sha else {},
    }
    if data is not None:
        view["elf"] = report.elf_tables(data, {})
    if rep is None:
        return view
    found = report.findings(rep)
    marks = report.field_marks(found)
    log_lines, log_hidden = report.mark_log(rep)
    image_sha = rep.get("kernel_sha256") if isinstance(rep.get("kernel_sha256"), str) else ""
    image = kernelinfo.image_for(store, image_sha, cfg.cache_dir,
                                 _load_base(rep.get("kernel_load_base")))
    pcs = []
    if found and found[0].pc is not None:
        pcs.append(("where the first finding was seen", found[0].pc))
    pc = rep.get("pc")
    if isinstance(pc, int) and pc not in [p for _, p in pcs]:
        pcs.append(("where the guest stopped", pc))
    code = []
    if image is not None:
        for label, addr in pcs:
            insns, note = kernelinfo.disassemble_around(image, addr)
            code.append({"label": label, "pc": addr, "where": image.describe(addr),
                         "insns": insns, "note": note,
                         "sources": {i.address: kernelinfo.source_text(image_sha, i.line)
                                     for i in insns}})
    backtrace = rep.get("backtrace") if isinstance(rep.get("backtrace"), list) else []
    view.update({
        "findings": found, "marks": marks, "log_lines": log_lines, "log_hidden": log_hidden,
        "segments": report.segment_rows(rep, marks),
        "heap": report.heap_picture(rep, found), "registers": report.registers(rep),
        "image": image, "image_sha": image_sha, "code": code,
        "dwarf": kernelinfo.image_lines(image).present if image is not None else False,
        "backtrace": _symbolize(image, [str(f) for f in backtrace], image_sha),
        "finding_frames": [_symbolize(image, f.frames, image_sha) for f in found],
        "ports": [p for p in rep.get("ports", []) if isinstance(p, dict)]
        if isinstance(rep.get("ports"), list) else [],
    })
    if data is not None:
        view["elf"] = report.elf_tables(data, marks)
    return view


# coverage -----------------------------------------------------------------------------------------

def _send_sample(store: FarmStore, cfg: Config, send: SendTask, kernel: str) -> bool:
    """Ask the workers for a coverage sample of `kernel`, unless one is queued or running
    (False)."""
    if not store.coverage.claim_job(kernel, cfg.coverage_sample):
        return False
    try:
        send("workers.tasks.sample_coverage", [kernel, cfg.coverage_sample])
    except Exception as e:  # noqa: BLE001 - the broker is down, say: the page says so
        store.coverage.set_job(kernel, {"state": "failed", "error": f"cannot send: {e}",
                                        "finished": time.time()})
    return True


FN_SORTS = ("address", "name", "blocks", "covered", "percent")


def _load_base(value: Any) -> int | None:
    """A load base from Redis: a page-aligned address, else None (the image's own)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 48 \
            and value % 4096 == 0:
        return value
    return None


def _coverage_view(store: FarmStore, cfg: Config, kernel: str, args: Any) -> dict[str, Any]:
    record = store.coverage.record(kernel)
    view: dict[str, Any] = {"kernel": kernel, "record": record, "rows": [],
                            "job": store.coverage.job(kernel),
                            "corpus": store.corpus.size(kernel)}
    current = store.kernels.get(kernel)
    if record is None:
        return view
    image = kernelinfo.image_for(store, str(record.get("image", "")), cfg.cache_dir,
                                 _load_base(record.get("load_base")))
    view["stale"] = current is None or record.get("image") != current.image
    if image is None:
        view["missing_image"] = True
        return view
    executed = coverage.Intervals(record.get("blocks", []))
    entry_only = set(record.get("entry_only", []))
    table = kernelinfo.image_lines(image)
    rows = []
    for fn in kernelinfo.functions(image):
        covered = sum(1 for b in fn.blocks if b in executed)
        rows.append({"fn": fn, "blocks": len(fn.blocks), "covered": covered,
                     "percent": 100.0 * covered / len(fn.blocks), "line": table.lookup(
                         fn.address), "entry_only": fn.name in entry_only})
    total_blocks = sum(r["blocks"] for r in rows)
    total_covered = sum(r["covered"] for r in rows)
    q = args.get("q", "").strip()
    show = args.get("show", "")
    sort = args.get("sort", "address")
    sort = sort if sort in FN_SORTS else "address"
    order = "desc" if args.get("order") == "desc" else "asc"
    picked = [r for r in rows if (not q or q.lower() in r["fn"].name.lower()) and (
        show != "covered" or r["covered"]) and (show != "uncovered" or not r["covered"]) and (
        show != "partial" or 0 < r["covered"] < r["blocks"])]
    keys: dict[str, Callable[[dict[str, Any]], Any]] = {
        "address": lambda r: r["fn"].address, "name": lambda r: r["fn"].name,
        "blocks": lambda r: r["blocks"], "covered": lambda r: r["covered"],
        "percent": lambda r: r["percent"]}
    picked.sort(key=keys[sort], reverse=order == "desc")
    view.update({"rows": picked, "functions": len(rows),
                 "functions_hit": sum(1 for r in rows if r["covered"]),
                 "total_blocks": total_blocks, "total_covered": total_covered,
                 "dwarf": table.present, "q": q, "show": show, "sort": sort, "order": order})
    return view


def _coverage_function(store: FarmStore, cfg: Config, kernel: str, addr: str) -> dict[str, Any]:
    try:
        address = int(addr, 16)
    except ValueError:
        abort(404)
    record = store.coverage.record(kernel)
    if record is None:
        abort(404)
    image = kernelinfo.image_for(store, str(record.get("image", "")), cfg.cache_dir,
                                 _load_base(record.get("load_base")))
    if image is None:
        abort(404)
    fn = next((f for f in kernelinfo.functions(image) if f.address == address), None)
    if fn is None:
        abort(404)
    executed = coverage.Intervals(record.get("blocks", []))
    leaders = set(fn.blocks)
    image_sha = str(record.get("image"))
    rows = []
    last_line = None
    for insn in kernelinfo.function_listing(image, fn)[:4000]:
        new_line = insn.line is not None and insn.line != last_line
        rows.append({"insn": insn, "leader": insn.address in leaders,
                     "executed": insn.address in executed, "new_line": new_line,
                     "source": kernelinfo.source_text(image_sha, insn.line)
                     if new_line else None})
        last_line = insn.line or last_line
    covered = sum(1 for b in fn.blocks if b in executed)
    return {"kernel": kernel, "fn": fn, "rows": rows, "covered": covered, "record": record,
            "dwarf": kernelinfo.image_lines(image).present,
            "entry_only": fn.name in set(record.get("entry_only", []))}
