"""The dashboard's pages, downloads, actions, health and metrics, through Flask's test client
against a real Redis filled by a real triage and minimization of the seed bug."""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from dashboard.__main__ import main
from dashboard.app import TOKEN_HEADER, create_app
from tests.dashboard.conftest import HOSTILE_ELF, SEED_BUG, FarmData
from tests.workers.conftest import _free_port
from workers import coverage, work

pytestmark = pytest.mark.redis


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf(app: Flask) -> str:
    return app.extensions["fuzzfarm"]["config"].csrf


def text(html: bytes) -> str:
    return html.decode()


def test_overview_shows_campaign_workers_and_findings(client: FlaskClient,
                                                      farm_data: FarmData) -> None:
    page = text(client.get("/").data)
    assert farm_data.campaign in page
    assert 'id="workers-alive">1<' in page
    assert "heap-corruption" in page and "kernel-panic" in page  # findings by class
    assert "<polyline" in page and "executions per second" in page  # charts from the series
    assert "121,000" in page  # the campaign's execs
    assert 'hx-trigger="every 5s"' in page
    frag = client.get("/fragment/overview")
    assert frag.status_code == 200 and b'id="overview-live"' in frag.data
    assert b"<html" not in frag.data  # a fragment, not a page


def test_buckets_sort_and_filter(client: FlaskClient, farm_data: FarmData) -> None:
    page = text(client.get("/buckets").data)
    assert farm_data.bucket in page and farm_data.hostile_bucket in page
    only = text(client.get("/buckets?class=heap-corruption").data)
    assert farm_data.bucket in only and farm_data.hostile_bucket not in only
    found = text(client.get("/buckets?q=LinkedListAllocator").data)
    assert farm_data.bucket in found and farm_data.hostile_bucket not in found
    # the seed bug's reproducer (8968 B) is larger than the hostile one
    by_size = text(client.get("/buckets?sort=size&order=desc").data)
    assert by_size.index(farm_data.bucket) < by_size.index(farm_data.hostile_bucket)
    by_size = text(client.get("/buckets?sort=size&order=asc").data)
    assert by_size.index(farm_data.hostile_bucket) < by_size.index(farm_data.bucket)
    assert client.get("/buckets?sort=__class__&order=x").status_code == 200
    assert b"8968 B" in client.get("/fragment/buckets?class=heap-corruption").data


def test_bucket_page_shows_the_seed_bug(client: FlaskClient, farm_data: FarmData) -> None:
    b = farm_data.store.buckets.get(farm_data.bucket)
    assert b is not None and b.minimized
    page = text(client.get(f"/bucket/{b.id}").data)
    # the minimized reproducer's report: segment 0 loaded at the allocator's block
    assert "0x300028" in page
    assert "allocation #6" in page  # the primary finding's evidence
    assert re.search(r'class="mono mark differs" data-field="segments\[0\]\.vaddr"', page) \
        or 'differs" data-field="segments[0].vaddr"' in page
    assert "src/mm/heap.rs" in page  # source lines from DWARF
    assert re.search(r"rustux::mm::heap::LinkedListAllocator::allocate\+0x[0-9a-f]+", page)
    assert 'class="current"' in page  # the faulting pc in the disassembly
    assert "rejected: segment overlaps the kernel" in page
    assert "← the kernel rejected the input" in page
    assert 'id="heap"' in page and "finding 1" in page  # the overlapped block is marked
    assert f'/download/{b.minimized}.elf' in page and f'/download/{b.reproducer}.elf' in page
    assert 'id="elf-phdrs"' in page
    assert f'value="{csrf(client.application)}"' in page


def test_original_report_marks_the_vaddr_field_in_the_program_headers(
        client: FlaskClient, farm_data: FarmData) -> None:
    page = text(client.get(f"/bucket/{farm_data.bucket}?input=original").data)
    assert "segment 0: ELF says vaddr 0x400000, kernel loaded vaddr 0x300028" in page
    # finding 3 (after the table as a whole) names segments[0].vaddr: the PT_LOAD 0 vaddr
    # cell of the ELF and the log line
    cell = re.search(r'<td class="mono mark" data-field="segments\[0\]\.vaddr">0x400000'
                     r'<span class="fnum">3</span>', page)
    assert cell, "the program header cell is not marked"
    assert "vaddr: ELF says 0x400000" in page
    assert "bad-entry" in page and "entry to user mode (see bad-entry)" in page


def test_hostile_text_is_escaped(client: FlaskClient, farm_data: FarmData) -> None:
    page = text(client.get(f"/bucket/{farm_data.hostile_bucket}").data)
    assert "<script>alert" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<svg onload" not in page and "<b>evidence</b>" not in page
    assert "&lt;b&gt;sample&lt;/b&gt;" in page
    assert "bad magic" in page  # the input is no ELF: elfview says so
    for url in ("/", "/buckets", "/fragment/buckets"):
        assert b"<img src=x" not in client.get(url).data
    resp = client.get(f"/bucket/{farm_data.hostile_bucket}")
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


def test_downloads_serve_only_bucket_inputs(client: FlaskClient, farm_data: FarmData) -> None:
    b = farm_data.store.buckets.get(farm_data.bucket)
    assert b is not None and b.minimized
    orig = client.get(f"/download/{b.reproducer}.elf")
    assert orig.status_code == 200 and orig.data == SEED_BUG
    assert "attachment" in orig.headers["Content-Disposition"]
    mini = client.get(f"/download/{b.minimized}.elf")
    assert hashlib.sha256(mini.data).hexdigest() == b.minimized
    assert client.get(f"/download/{farm_data.hostile_sha}.elf").data == HOSTILE_ELF
    rep = client.get(f"/download/{b.minimized}.json?kernel=seed")
    assert rep.status_code == 200 and json.loads(rep.data)["input_sha256"] == b.minimized
    image_sha = farm_data.store.kernels.get("seed").image  # a blob, but no bucket's input
    assert client.get(f"/download/{image_sha}.elf").status_code == 404
    assert client.get(f"/download/{b.reproducer.upper()}.elf").status_code == 404
    assert client.get("/download/..%2f..%2fetc%2fpasswd.elf").status_code == 404
    assert client.get(f"/download/{b.minimized}.json?kernel=../x").status_code == 404
    assert client.get(f"/download/{b.minimized}.json").status_code == 404


def test_actions_need_the_token(client: FlaskClient, farm_data: FarmData) -> None:
    bid = farm_data.bucket
    before = len(farm_data.sent)
    assert client.post(f"/bucket/{bid}/minimize").status_code == 403
    assert client.post(f"/bucket/{bid}/minimize", data={"token": "nope"}).status_code == 403
    assert len(farm_data.sent) == before
    ok = client.post(f"/bucket/{bid}/minimize", data={"token": csrf(client.application)})
    assert ok.status_code == 303 and "notice=minimize" in ok.headers["Location"]
    ok = client.post(f"/bucket/{bid}/verify", data={"kernel": "fixed"},
                     headers={TOKEN_HEADER: csrf(client.application)})
    assert ok.status_code == 303
    assert farm_data.sent[before:] == [("workers.tasks.minimize", [bid]),
                                       ("workers.tasks.verify", [bid, "fixed"])]
    bad = client.post(f"/bucket/{bid}/verify",
                      data={"kernel": "nosuch", "token": csrf(client.application)})
    assert bad.status_code == 400
    assert b"Minimization sent" in client.get(f"/bucket/{bid}?notice=minimize").data


def test_actions_send_real_celery_messages(farm_data: FarmData) -> None:
    app = create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir)
    c = app.test_client()
    r = redis.Redis.from_url(farm_data.server.url)
    queued = r.llen("minimize")
    resp = c.post(f"/bucket/{farm_data.bucket}/minimize", data={"token": csrf(app)})
    assert resp.status_code == 303
    assert r.llen("minimize") == queued + 1
    message = json.loads(r.lindex("minimize", 0))
    assert message["headers"]["task"] == "workers.tasks.minimize"
    assert farm_data.bucket in message["headers"]["argsrepr"]
    r.delete("minimize")


def test_remote_mode_requires_the_configured_token(farm_data: FarmData) -> None:
    app = create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                     token="s3cret-token", local=False, send_task=lambda n, a: None)
    c = app.test_client()
    page = text(c.get(f"/bucket/{farm_data.bucket}", headers={"Host": "farm.example"}).data)
    assert 'type="password" name="token"' in page and "s3cret-token" not in page
    url = f"/bucket/{farm_data.bucket}/minimize"
    assert c.post(url, data={"token": csrf(app)}).status_code == 403  # the process token
    assert c.post(url, data={"token": "s3cret-token"}).status_code == 303


def test_local_mode_answers_local_host_names_only(client: FlaskClient) -> None:
    assert client.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8000"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_main_refuses_a_public_host_without_token(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FUZZFARM_DASHBOARD_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "FUZZFARM_DASHBOARD_TOKEN" in err and len(err.strip().splitlines()) == 1


def test_health_and_metrics(client: FlaskClient, farm_data: FarmData) -> None:
    ok = client.get("/healthz")
    assert ok.status_code == 200 and ok.get_json() == {"redis": "ok"}
    dead = create_app(f"redis://127.0.0.1:{_free_port()}/0", send_task=lambda n, a: None)
    down = dead.test_client().get("/healthz")
    assert down.status_code == 503 and down.get_json()["redis"] == "down"
    assert dead.test_client().get("/").status_code == 503  # pages say Redis is down
    m = client.get("/metrics")
    assert m.status_code == 200 and m.mimetype == "text/plain"
    assert "version=0.0.4" in m.content_type
    body = m.data.decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["fuzzfarm_execs"].type == "counter"
    assert families["fuzzfarm_harness_errors"].type == "counter"
    assert families["fuzzfarm_buckets"].type == "gauge"
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["fuzzfarm_execs_total"] == 121000
    assert values["fuzzfarm_execs_per_second"] == 40.0 + 3 * 11  # the latest point
    assert values[f'fuzzfarm_campaign_edges{{campaign="{farm_data.campaign}",kernel="seed"}}'] \
        == 410
    assert values['fuzzfarm_buckets{class="heap-corruption"}'] == 1
    assert values['fuzzfarm_buckets{class="kernel-panic"}'] == 1
    assert values["fuzzfarm_workers_alive"] == 1
    assert values["fuzzfarm_triage_backlog"] == 0
    assert "fuzzfarm_harness_errors_total" in values
    assert values['fuzzfarm_corpus_size{kernel="seed"}'] == 3


def test_unknown_things_are_404(client: FlaskClient) -> None:
    for url in ("/bucket/zzzz", "/bucket/" + "0" * 16, "/coverage/nosuch",
                "/coverage/seed/fn/xyz", "/coverage/../etc"):
        assert client.get(url).status_code == 404, url


def test_coverage_is_sampled_by_the_workers_and_shown(client: FlaskClient,
                                                        farm_data: FarmData) -> None:
    store = farm_data.store
    page = text(client.get("/coverage/seed").data)
    assert "No sample yet" in page
    before = len(farm_data.sent)
    resp = client.post("/coverage/seed/sample", data={"token": csrf(client.application)})
    assert resp.status_code == 303 and "notice=sample" in resp.headers["Location"]
    # the dashboard only sends the task (to the workers' coverage queue) and claims the slot
    assert farm_data.sent[before:] == [("workers.tasks.sample_coverage", ["seed", 4])]
    assert store.coverage.job("seed")["state"] == "starting"
    assert "waiting for a worker" in text(client.get("/fragment/coverage/seed/job").data)
    again = client.post("/coverage/seed/sample", data={"token": csrf(client.application)})
    assert "notice=sample-busy" in again.headers["Location"]  # one sample per build
    assert len(farm_data.sent) == before + 1

    # what the worker does with that task
    record = coverage.run_sample(store, farm_data.settings, "seed", 4)
    assert store.coverage.job("seed")["state"] == "done"
    assert store.coverage.record("seed") == record
    # 3 corpus inputs, the 2 reproducers of the seed bucket and the hostile one
    assert record["corpus_inputs"] == 3 and record["inputs"] == 6
    assert record["entry_only"] and record["blocks"]
    page = text(client.get("/coverage/seed").data)
    assert 'id="functions-hit"' in page and "Last sample finished" in page
    rows = re.findall(r'<tr class="fn-row( hit)?" data-name="([^"]+)" data-covered="(\d+)"',
                      page)
    covered = {name: int(n) for _, name, n in rows}
    assert covered["rustux::loader::elf::load"] > 0  # every input goes through the loader
    assert covered["efi_main"] > 0  # the boot before the snapshot point is counted too
    assert any(n == 0 for n in covered.values())  # and not everything is marked
    assert "src/loader/elf.rs" in page
    addr = re.search(r'/coverage/seed/fn/([0-9a-f]+)">rustux::loader::elf::load<', page)
    assert addr
    fn_page = text(client.get(f"/coverage/seed/fn/{addr.group(1)}").data)
    assert "reached" in fn_page and 'class="srcline"' in fn_page
    assert "seed" in text(client.get("/coverage").data)
    # a finished sample leaves the slot free for the next one
    assert store.coverage.claim_job("seed", 1)
    assert not store.coverage.claim_job("seed", 1)
    store.coverage.set_job("seed", {"state": "done", "done": 6, "total": 6,
                                    "finished": time.time()})


def test_a_sample_that_fails_says_so_on_the_page(farm_data: FarmData) -> None:
    def down(_name: str, _args: list) -> None:
        raise ConnectionError("the broker is down")

    app = create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                     send_task=down)
    c = app.test_client()
    resp = c.post("/coverage/fixed/sample", data={"token": csrf(app)})
    assert resp.status_code == 303
    page = text(c.get("/coverage/fixed").data)
    assert "The last sample failed: cannot send: the broker is down" in page
    with pytest.raises(Exception, match="no-such-build"):  # as the worker would find it
        coverage.run_sample(farm_data.store, farm_data.settings, "no-such-build", 2)
    assert farm_data.store.coverage.job("no-such-build")["state"] == "failed"
    assert farm_data.store.coverage.claim_job("fixed", 1)  # a failed sample frees the slot
    farm_data.store.coverage.set_job("fixed", {"state": "done", "done": 0, "total": 0,
                                               "finished": time.time()})


def test_each_bucket_says_whether_it_reproduces_on_real_firmware(
        client: FlaskClient, farm_data: FarmData) -> None:
    bid, store = farm_data.hostile_bucket, farm_data.store
    page = client.get(f"/bucket/{bid}").get_data(as_text=True)
    assert re.search(r"reproduces on QEMU \+ OVMF</th><td id=\"crosscheck\"><span "
                     r"class=\"muted\">not run</span>", page)
    before = len(farm_data.sent)
    assert client.post(f"/bucket/{bid}/crosscheck").status_code == 403
    assert len(farm_data.sent) == before and store.buckets.get(bid).crosscheck is None
    ok = client.post(f"/bucket/{bid}/crosscheck", data={"token": csrf(client.application)})
    assert ok.status_code == 303 and "notice=crosscheck" in ok.headers["Location"]
    assert farm_data.sent[before:] == [("workers.tasks.crosscheck", [bid])]
    page = client.get(f"/bucket/{bid}").get_data(as_text=True)
    assert "not run: queued" in page and "only those with QEMU + OVMF" not in page
    # what a worker stores when the logs differ: each differing line, as text
    store.buckets.set_crosscheck(bid, {
        "state": "no", "input": "0" * 64, "lines": 14, "more_differences": 2,
        "differences": [[14, "rejected: <b>overlap</b>", "[user] enter rip=0x0 <i>"]]})
    page = client.get(f"/fragment/bucket/{bid}/status").get_data(as_text=True)
    assert 'class="badge crosscheck-no">no</span>' in page and "3 line(s) differ" in page
    assert "&lt;b&gt;overlap&lt;/b&gt;" in page and "<b>overlap" not in page
    store.buckets.set_crosscheck(bid, {"state": "not-run", "input": "0" * 64,
                                       "reason": "build 'seed' is no UEFI application"})
    assert "not run: build &#39;seed&#39; is no UEFI application" in client.get(
        f"/fragment/bucket/{bid}/status").get_data(as_text=True)


def test_reports_show_code_and_source_lines_of_uefi_and_elf_builds(
        client: FlaskClient, farm_data: FarmData) -> None:
    from kernel_emu.profile import PROFILE_DIR
    from workers.kernels import add_kernel

    store = farm_data.store
    add_kernel(store, PROFILE_DIR / "seed-elf.toml")
    out = work.triage_input(store, farm_data.settings, farm_data.seed_sha, "seed-elf",
                            lambda _b: None)
    assert out["state"] == "crash" and out["bucket"] == farm_data.bucket  # the same bug
    for kernel, load_base in (("seed", 0x100000), ("seed-elf", None)):
        report = store.reports.get(farm_data.seed_sha, kernel)
        assert report is not None and report.get("kernel_load_base") == load_base
        page = client.get(f"/bucket/{farm_data.bucket}?input=original&kernel={kernel}")
        text = page.get_data(as_text=True)
        assert page.status_code == 200
        assert "no .debug_line" not in text and "is not in Redis" not in text
        # a UEFI build's backtrace is named from its link map, its lines come from its DWARF
        # companion, at the addresses where the emulated firmware loaded the image
        assert "rustux::mm::heap::LinkedListAllocator::allocate" in text
        assert re.search(r"src/mm/heap\.rs:\d+", text)
        assert re.search(r"src/loader/elf\.rs:\d+", text)
