"""The dashboard in a real browser: Debian's Chromium, headless, driven by Selenium through the
system chromedriver, against the app served by waitress on a free port. Screenshots of the main
pages are saved under out/screenshots/."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from kernel_emu import qemu
from tests.dashboard.conftest import ROOT, SCREENSHOTS, FarmData
from tests.workers.conftest import _free_port

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoAlertPresentException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    if os.environ.get("CI"):
        raise  # CI must run these tests, not skip them
    pytest.skip("selenium is not installed", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.redis]

SHOTS = ROOT / "out" / "screenshots"


def _find(*names: str) -> str | None:
    return next((p for p in (shutil.which(n) for n in names) if p), None)


@pytest.fixture(scope="module")
def base_url(app: Flask) -> Iterator[str]:
    from waitress import create_server

    port = _free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    chromium = _find("chromium", "chromium-browser")
    driver_exe = _find("chromedriver")
    if chromium is None or driver_exe is None:
        how = "sudo apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"Chromium and chromedriver are needed in CI: {how}")
        pytest.skip(f"Chromium or chromedriver is not installed (make test installs them when "
                    f"run as root); to run the browser tests: {how}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "download.directory_upgrade": True, "safebrowsing.enabled": True})
    driver = webdriver.Chrome(service=Service(executable_path=driver_exe), options=opts)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """The whole page, not only the window."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True})
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    SCREENSHOTS.append(path)
    return path


def no_alert(driver: Any) -> bool:
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return True
    print(f"alert: {text}")
    return False


def test_overview_updates_live(browser: Any, base_url: str, farm_data: FarmData) -> None:
    browser.get(base_url + "/")
    assert farm_data.campaign in browser.find_element(By.ID, "campaigns").text
    assert browser.find_elements(By.CSS_SELECTOR, ".chart polyline")
    assert browser.find_element(By.ID, "workers-alive").text == "1"
    screenshot(browser, "overview")
    # htmx polls the overview's fragment: a new worker shows without a reload
    farm_data.store.stats.heartbeat("w2@test", "triage")
    try:
        # the fragment may be swapped between finding an element and reading it
        WebDriverWait(browser, 12, poll_frequency=0.5,
                      ignored_exceptions=[NoSuchElementException,
                                          StaleElementReferenceException]).until(
            lambda d: d.find_element(By.ID, "workers-alive").text == "2"
            and "w2@test" in d.find_element(By.ID, "workers").text)
    finally:
        farm_data.store.stats.forget_worker("w2@test")


def test_buckets_page(browser: Any, base_url: str, farm_data: FarmData) -> None:
    browser.get(base_url + "/buckets?sort=size&order=desc")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.bucket-row")
    assert [r.get_attribute("data-bucket") for r in rows][0] == farm_data.bucket
    screenshot(browser, "buckets")


def test_bucket_page_and_downloads(browser: Any, base_url: str, farm_data: FarmData,
                                   downloads: Path) -> None:
    bucket = farm_data.store.buckets.get(farm_data.bucket)
    assert bucket is not None and bucket.minimized
    browser.get(f"{base_url}/bucket/{bucket.id}")
    findings = browser.find_element(By.ID, "findings").text
    assert "0x300028" in findings
    cell = browser.find_element(By.CSS_SELECTOR, '#segments td[data-field="segments[0].vaddr"]')
    # the value, then the number of the finding that names the field
    assert cell.text.startswith("0x300028") and "differs" in cell.get_attribute("class")
    assert cell.find_element(By.CSS_SELECTOR, ".fnum").text.isdigit()
    marked = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#kernel-log .ln.mark")]
    assert any("vaddr=0x300028" in line for line in marked)
    crosschecked = browser.find_element(By.ID, "crosscheck").text
    if qemu.missing() is None:  # the fixture ran it on QEMU + OVMF
        assert crosschecked.startswith("yes") and "log lines are the same" in crosschecked
    else:
        assert crosschecked == "not run"
    screenshot(browser, "bucket-minimized")

    browser.find_element(By.ID, "download-minimized").click()
    target = downloads / f"{bucket.minimized}.elf"
    WebDriverWait(browser, 15, poll_frequency=0.2).until(lambda _d: target.is_file())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == bucket.minimized
    # the original's link, fetched by the browser itself
    href = browser.find_element(By.ID, "download-original").get_attribute("href")
    digest = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer())"
        ".then(b => crypto.subtle.digest('SHA-256', b))"
        ".then(h => done(Array.from(new Uint8Array(h))"
        ".map(x => x.toString(16).padStart(2, '0')).join('')));", href)
    assert digest == bucket.reproducer

    browser.get(f"{base_url}/bucket/{bucket.id}?input=original")
    cell = browser.find_element(By.CSS_SELECTOR, '#elf-phdrs td[data-field="segments[0].vaddr"]')
    assert "mark" in cell.get_attribute("class") and cell.text.startswith("0x400000")
    assert "kernel loaded vaddr 0x300028" in browser.find_element(By.ID, "findings").text
    screenshot(browser, "bucket-original")

    browser.find_element(By.ID, "minimize-button").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "notice"))
    assert ("workers.tasks.minimize", [bucket.id]) in farm_data.sent


def test_kernel_log_markup_is_text(browser: Any, base_url: str, farm_data: FarmData) -> None:
    browser.get(f"{base_url}/bucket/{farm_data.hostile_bucket}")
    log = browser.find_element(By.ID, "kernel-log")
    assert "<script>alert(1)</script><b>x</b>" in log.text
    assert not log.find_elements(By.TAG_NAME, "b")
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, img, svg[onload], u")
    assert "<b>evidence</b> & more" in browser.find_element(By.ID, "findings").text
    assert no_alert(browser)
    screenshot(browser, "bucket-hostile")


def test_coverage_page(browser: Any, base_url: str) -> None:
    browser.get(base_url + "/coverage/seed")
    screenshot(browser, "coverage")
    # the sampler itself is tested through the test client
    assert browser.find_element(By.ID, "sample-button").text == "Sample coverage now"


@pytest.fixture(scope="module")
def guarded_url(farm_data: FarmData) -> Iterator[str]:
    """The dashboard with FUZZFARM_DASHBOARD_READ_TOKEN set, served by waitress."""
    from waitress import create_server

    from dashboard.app import create_app

    app = create_app(farm_data.server.url, cache_dir=farm_data.settings.cache_dir,
                     read_token=READ_TOKEN, send_task=lambda name, args: None)
    port = _free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    server.close()


READ_TOKEN = "browser-read-token-31c9"


def test_signing_in_with_the_read_token(browser: Any, guarded_url: str,
                                        farm_data: FarmData) -> None:
    browser.get(f"{guarded_url}/bucket/{farm_data.bucket}")
    assert browser.find_elements(By.ID, "login-button")
    assert not browser.find_elements(By.ID, "findings")
    screenshot(browser, "login")
    browser.find_element(By.NAME, "token").send_keys(READ_TOKEN)
    browser.find_element(By.ID, "login-button").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "findings"))
    assert browser.current_url == f"{guarded_url}/bucket/{farm_data.bucket}"
    assert "0x300028" in browser.find_element(By.ID, "findings").text
    # the session cookie is out of reach of the page's scripts, and is not the token
    assert browser.execute_script("return document.cookie") == ""
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["value"] != READ_TOKEN
    assert READ_TOKEN not in browser.page_source
    # the overview's polled fragment goes through with the cookie
    browser.get(f"{guarded_url}/")
    farm_data.store.stats.heartbeat("w3@test", "triage")
    try:
        WebDriverWait(browser, 12, poll_frequency=0.5,
                      ignored_exceptions=[NoSuchElementException,
                                          StaleElementReferenceException]).until(
            lambda d: "w3@test" in d.find_element(By.ID, "workers").text)
    finally:
        farm_data.store.stats.forget_worker("w3@test")
    browser.find_element(By.LINK_TEXT, "sign out").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "login-button"))
    browser.get(f"{guarded_url}/buckets")
    assert browser.find_elements(By.ID, "login-button")
    assert no_alert(browser)
