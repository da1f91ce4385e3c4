"""Who may read the dashboard: its read token (login form, `?token=`, a bearer header) or an
authenticating reverse proxy's header; and names from Redis that never reach the file system.
The real app over a real Redis, through Flask's test client."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from dashboard import kernelinfo
from dashboard.__main__ import main
from dashboard.access import COOKIE, AccessError, ReadAccess
from dashboard.app import create_app
from tests.dashboard.conftest import FarmData
from tests.workers.conftest import running_redis
from workers.kernels import ensure_builtin
from workers.store import FarmStore, sha256

pytestmark = pytest.mark.redis

READ_TOKEN = "read-token-5d1f0c8e7a"
ACTION_TOKEN = "action-token-9b2e4f"


def text(data: bytes) -> str:
    return data.decode("utf-8")


@pytest.fixture(scope="module")
def guarded(farm_data: FarmData) -> Flask:
    return create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                      token=ACTION_TOKEN, read_token=READ_TOKEN,
                      send_task=lambda name, args: farm_data.sent.append((name, args)))


def _cookie(client: FlaskClient) -> str | None:
    found = client.get_cookie(COOKIE)
    return found.value if found is not None else None


def test_every_page_but_the_health_check_needs_the_read_token(guarded: Flask,
                                                              farm_data: FarmData) -> None:
    c = guarded.test_client()
    pages = ["/", "/buckets", f"/bucket/{farm_data.bucket}", "/coverage", "/coverage/seed",
             "/fragment/overview", f"/fragment/bucket/{farm_data.bucket}/status"]
    for page in pages:
        r = c.get(page)
        assert r.status_code == 401, page
        assert 'name="token"' in text(r.data) and READ_TOKEN not in text(r.data)
    for page in ("/metrics", f"/download/{farm_data.seed_sha}.elf",
                 f"/download/{farm_data.seed_sha}.json?kernel=seed"):
        r = c.get(page)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert c.post(f"/bucket/{farm_data.bucket}/minimize",
                  data={"token": ACTION_TOKEN}).status_code == 401
    assert c.get("/healthz").status_code == 200
    assert c.get("/static/dashboard.css").status_code == 200
    # a program sends the token with every request
    bearer = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert c.get("/metrics", headers=bearer).status_code == 200
    assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    # ... or holds the action token, which may read too
    assert c.get("/", headers={"X-Fuzzfarm-Token": ACTION_TOKEN}).status_code == 200
    assert _cookie(c) is None


def test_the_login_form_sets_a_cookie_that_is_not_the_token(guarded: Flask,
                                                            farm_data: FarmData) -> None:
    c = guarded.test_client()
    page = f"/bucket/{farm_data.bucket}?input=original"
    form = text(c.get(page).data)
    assert re.search(r'name="next" value="/bucket/[0-9a-f]+\?input=original"', form)
    wrong = c.post("/login", data={"token": "guess", "next": page})
    assert wrong.status_code == 401 and 'id="login-wrong"' in text(wrong.data)
    assert _cookie(c) is None
    ok = c.post("/login", data={"token": READ_TOKEN, "next": page})
    assert ok.status_code == 303 and ok.headers["Location"] == page
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and READ_TOKEN not in cookie
    shown = c.get(page)
    assert shown.status_code == 200 and 'id="reader"' in text(shown.data)
    assert READ_TOKEN not in text(shown.data)
    assert c.get("/fragment/overview").status_code == 200
    assert c.get("/metrics").status_code == 200
    # the action still needs the action token
    assert c.post(f"/bucket/{farm_data.bucket}/minimize", data={"token": READ_TOKEN}
                  ).status_code == 403
    # signing out ends it
    assert c.get("/logout").status_code == 303
    assert c.get(page).status_code == 401


def test_a_token_in_the_address_is_taken_out_of_it(guarded: Flask,
                                                   farm_data: FarmData) -> None:
    c = guarded.test_client()
    r = c.get(f"/buckets?sort=count&token={READ_TOKEN}&order=asc")
    assert r.status_code == 303 and r.headers["Location"] == "/buckets?sort=count&order=asc"
    assert _cookie(c) is not None and READ_TOKEN not in r.headers["Location"]
    assert c.get("/buckets?sort=count&order=asc").status_code == 200
    other = guarded.test_client()
    assert other.get("/buckets?token=wrong").status_code == 401
    # a login never sends the browser to another site
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "x"):
        r = other.post("/login", data={"token": READ_TOKEN, "next": target})
        assert r.headers["Location"] == "/", target


def test_a_cookie_made_for_another_token_opens_nothing(guarded: Flask, farm_data: FarmData
                                                       ) -> None:
    stale = ReadAccess(read_token="the-token-before-rotation").cookie_value()
    c = guarded.test_client()
    c.set_cookie(COOKIE, stale)
    assert c.get("/").status_code == 401
    c.set_cookie(COOKIE, READ_TOKEN)  # the token itself is not the cookie either
    assert c.get("/").status_code == 401


def test_htmx_polling_after_the_session_ended_goes_to_the_login(guarded: Flask) -> None:
    r = guarded.test_client().get("/fragment/overview", headers={
        "HX-Request": "true", "HX-Current-URL": "http://127.0.0.1:8000/buckets?q=vaddr"})
    assert r.status_code == 401
    assert r.headers["HX-Redirect"] == "/login?next=/buckets?q%3Dvaddr"


def test_a_trusted_proxy_header_is_the_user(farm_data: FarmData) -> None:
    app = create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                     trust_header="X-Forwarded-User", send_task=lambda name, args: None)
    c = app.test_client()
    r = c.get("/")
    assert r.status_code == 401 and "reverse proxy" in text(r.data)
    assert 'name="token"' not in text(r.data)  # nothing to type: the proxy signs users in
    assert c.get("/metrics").status_code == 401
    alice = c.get("/", headers={"X-Forwarded-User": "alice@example.org"})
    assert alice.status_code == 200
    assert re.search(r'id="reader">\s*alice@example.org\s*<', text(alice.data))
    hostile = c.get("/", headers={"X-Forwarded-User": "<script>alert(1)</script>"})
    assert "<script>alert(1)" not in text(hostile.data)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text(hostile.data)
    assert c.get("/", headers={"X-Forwarded-User": "  "}).status_code == 401
    assert c.get("/login").status_code == 303  # no token to sign in with
    with pytest.raises(AccessError, match="not a header name"):
        ReadAccess(trust_header="X-User: admin")


def test_without_either_the_pages_stay_open_on_localhost(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert 'id="reader"' not in text(client.get("/").data)


def test_main_refuses_a_bad_trust_header_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("FUZZFARM_DASHBOARD_TRUST_HEADER", "X Bad Header")
    monkeypatch.setenv("FUZZFARM_CACHE", str(tmp_path / "cache"))
    assert main(["--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "FUZZFARM_DASHBOARD_TRUST_HEADER" in err and len(err.strip().splitlines()) == 1


# names from Redis --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FarmStore, Path]]:
    """A Redis of its own: the hostile records below would upset the other tests' pages."""
    tmp = tmp_path_factory.mktemp("hostile-farm")
    with running_redis(tmp / "redis") as server:
        store = FarmStore.connect(server.url)
        ensure_builtin(store)
        yield store, tmp


def test_hostile_image_ids_and_names_are_404s(own_farm: tuple[FarmStore, Path]) -> None:
    store, tmp = own_farm
    cache = tmp / "jail" / "cache"
    app = create_app(store_url(store), cache_dir=cache, send_task=lambda name, args: None)
    c = app.test_client()
    for image in ("../../../../../../etc/passwd", "/etc/passwd", "a" * 64 + "\n"):
        store.coverage.put_record("seed", {
            "kernel": "seed", "image": image, "time": 0.0, "seconds": 1.0, "inputs": 1,
            "corpus_inputs": 1, "reproducers": 0, "limit": 1, "verdicts": {"ok": 1},
            "errors": [], "error_count": 0, "entry_only": [], "blocks": []})
        page = c.get("/coverage/seed")
        assert page.status_code == 200 and "no longer in Redis" in text(page.data)
        assert c.get("/coverage/seed/fn/1000").status_code == 404
    sha = "ab" * 32
    for path in (f"/download/{sha}%0A.elf", f"/download/{sha}%00.elf",
                 "/download/..%2F..%2Fetc%2Fpasswd.elf", "/bucket/0123456789abcdef%0A",
                 "/coverage/..%2F..%2Fetc", "/coverage/seed%0A", f"/coverage/{'a' * 5000}"):
        assert c.get(path).status_code == 404, path
    # nothing was fetched for any of them: not even the cache folder was needed
    assert not (tmp / "jail").exists()


def store_url(store: FarmStore) -> str:
    kwargs = store._conn.client.connection_pool.connection_kwargs  # noqa: SLF001
    return f"redis://:{kwargs['password']}@{kwargs['host']}:{kwargs['port']}/0"


def test_a_cached_image_changed_since_is_fetched_again(own_farm: tuple[FarmStore, Path]) -> None:
    store, tmp = own_farm
    entry = store.kernels.get("seed")
    assert entry is not None
    image = kernelinfo.image_for(store, entry.image, tmp / "cache")
    assert image is not None
    image.path.write_bytes(b"changed since")
    again = kernelinfo.image_for(store, entry.image, tmp / "cache")
    assert again is not None and sha256(again.path.read_bytes()) == entry.image


def test_a_cache_folder_others_can_write_is_said_on_the_page(
        own_farm: tuple[FarmStore, Path], farm_data: FarmData) -> None:
    store, tmp = own_farm
    shared = tmp / "shared-cache"
    shared.mkdir()
    os.chmod(shared, 0o777)
    app = create_app(farm_data.server.url, cache_dir=shared, send_task=lambda name, args: None)
    r = app.test_client().get(f"/bucket/{farm_data.bucket}")
    assert r.status_code == 500 and "writable by others" in text(r.data)
    assert "Traceback" not in text(r.data)
