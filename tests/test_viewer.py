"""The viewer (viewer/): its page server against a real TorchServe, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from viewer import server as viewer

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps calling out, flooding a closed network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WAIT_S = 120  # an upper bound for the page to show an answer while the rest of the suite loads the machine


def start_viewer(inference_url: str, key_file: Path) -> viewer.ViewerServer:
    """A page server on a free loopback port, serving from a thread."""
    page = viewer.make_server(0, inference_url, key_file)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    return page


def stop_viewer(page: viewer.ViewerServer) -> None:
    page.shutdown()
    page.server_close()


@pytest.fixture
def page(server):
    """The viewer in front of the session's TorchServe; always stopped."""
    running = start_viewer(server.inference_url, server.key_file)
    try:
        yield running
    finally:
        stop_viewer(running)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def form(photo: bytes, **fields) -> dict:
    return {"files": {"image": ("photo.jpg", photo, "application/octet-stream")}, "data": fields}


# The page server, called as the page calls it.


def test_the_page_server_serves_the_page_with_nothing_from_elsewhere(page):
    response = requests.get(page.url, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "http://" not in response.text and "https://" not in response.text  # offline: no outside resource
    missing = requests.get(page.url + "favicon.ico", timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == 404


def test_the_page_server_forwards_answers_and_errors_with_the_token(page, photos):
    answer = requests.post(page.url + "explain", timeout=WAIT_S, **form(photos["chelsea"], target="lynx", topk="3"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["explained_class"]["label"] == "lynx" and len(answer.json()["predictions"]) == 3
    refused = requests.post(page.url + "explain", timeout=WAIT_S, **form(b"just some text\n"))
    assert refused.status_code == 400
    assert refused.json()["message"].startswith("the data is not an image")
    unknown = requests.post(page.url + "explain", timeout=WAIT_S, **form(photos["chelsea"], target="x" * 100))
    assert unknown.status_code == 400 and "... (102 characters) is neither a class index" in unknown.json()["message"]
    raw = requests.post(
        page.url + "explain", data=photos["chelsea"], headers={"Content-Type": "image/jpeg"}, timeout=WAIT_S
    )
    assert raw.status_code == 415


def test_the_page_server_reads_the_key_file_again_when_the_token_is_refused(server, photos, tmp_path):
    keys = json.loads(server.key_file.read_text())
    key_file = tmp_path / "key_file.json"
    stale = {**keys, "inference": {**keys["inference"], "key": "expired0"}}
    key_file.write_text(json.dumps(stale))
    page = start_viewer(server.inference_url, key_file)
    try:
        refused = requests.post(page.url + "explain", timeout=WAIT_S, **form(photos["coffee"]))
        assert refused.status_code == 400 and "Token Authorization failed" in refused.json()["message"]
        key_file.write_text(json.dumps(keys))  # the key rotated: the page server holds the old one
        answered = requests.post(page.url + "explain", timeout=WAIT_S, **form(photos["coffee"]))
        assert answered.status_code == 200 and answered.json()["predictions"][0]["label"] == "espresso"
    finally:
        stop_viewer(page)


def test_the_page_server_bounds_the_body(page):
    body = b"\0" * (viewer.MAX_BODY_BYTES + 1)
    refused = requests.post(
        page.url + "explain", data=body, headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=WAIT_S
    )
    assert refused.status_code == 413
    assert refused.json()["message"] == "the photo is over 20 MiB (20,971,520 bytes), the model's limit"


def test_the_page_server_says_when_torchserve_does_not_answer(server, photos):
    page = start_viewer(f"http://127.0.0.1:{free_port()}", server.key_file)
    try:
        down = requests.post(page.url + "explain", timeout=WAIT_S, **form(photos["coffee"]))
    finally:
        stop_viewer(page)
    assert down.status_code == 502
    assert down.json()["message"].startswith("the model server (TorchServe at http://127.0.0.1:")
    assert "does not answer; start it with `make demo`" in down.json()["message"]


# The page in a real browser.


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        missing = "headless Chromium is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("DVE_REQUIRE_BROWSER"):  # CI installs it: there, a missing browser is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    return browser, driver


@pytest.fixture
def browser():
    """Headless Chromium through chromedriver, with a fresh profile; always quit."""
    browser_path, driver_path = _chromium()

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="viewer-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1100,900")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d))


def element(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def rendered(driver) -> int:
    """How many maps the page has drawn so far."""
    return int(element(driver, "#map").get_attribute("data-rendered") or 0)


def map_pixels(driver) -> str:
    return driver.execute_script("return document.getElementById('map').toDataURL()")


def upload(driver, path: Path) -> None:
    element(driver, "#file").send_keys(str(path))


def test_the_page_shows_classes_and_the_explanation_of_a_photo(browser, page, photos, tmp_path):
    from selenium.webdriver.common.by import By

    (tmp_path / "chelsea.jpg").write_bytes(photos["chelsea"])
    browser.get(page.url)
    upload(browser, tmp_path / "chelsea.jpg")
    wait_for(browser, lambda d: rendered(d) == 1)
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#classes .class .label")]
    assert len(labels) == 5 and "cat" in labels[0]
    assert " ms." in element(browser, "#status").text
    # The map: the response's size, coloured, with the salient box over the photo.
    width, height, opaque = browser.execute_script(
        "const c = document.getElementById('map'); "
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [c.width, c.height, n];"
    )
    assert (width, height) == (224, 149) and 0 < opaque < width * height
    assert element(browser, "#box").is_displayed()
    assert browser.execute_script("return document.getElementById('photo').naturalWidth") == 451
    dve = map_pixels(browser)
    element(browser, "#show-targeted").click()
    wait_for(browser, lambda d: rendered(d) == 2)
    assert map_pixels(browser) != dve
    assert not element(browser, "#error").is_displayed()


def test_clicking_a_class_explains_it(browser, page, photos, tmp_path):
    from selenium.webdriver.common.by import By

    (tmp_path / "chelsea.jpg").write_bytes(photos["chelsea"])
    browser.get(page.url)
    upload(browser, tmp_path / "chelsea.jpg")
    wait_for(browser, lambda d: rendered(d) == 1)
    agnostic = map_pixels(browser)
    tabby = next(
        b for b in browser.find_elements(By.CSS_SELECTOR, "#classes .class") if b.get_attribute("data-index") == "281"
    )
    tabby.click()
    wait_for(browser, lambda d: rendered(d) == 2)
    assert element(browser, "#result").get_attribute("data-explained") == "281"
    assert "tabby" in element(browser, "#explained").text
    tabby_map = map_pixels(browser)
    assert tabby_map != agnostic
    lynx = next(
        b for b in browser.find_elements(By.CSS_SELECTOR, "#classes .class") if b.get_attribute("data-index") == "287"
    )
    lynx.click()
    wait_for(browser, lambda d: rendered(d) == 3)
    assert element(browser, "#result").get_attribute("data-explained") == "287"
    assert map_pixels(browser) not in (agnostic, tabby_map)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log li")) == 3  # each answer with its time


def test_the_page_says_in_plain_words_what_went_wrong(browser, page, server, photos, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo at all\n")
    browser.get(page.url)
    upload(browser, tmp_path / "notes.txt")
    wait_for(browser, lambda d: element(d, "#error").is_displayed())
    assert "This file is not a photo the model can read" in element(browser, "#error").text
    assert not element(browser, "#result").is_displayed()
    (tmp_path / "huge.jpg").write_bytes(b"\xff\xd8" + b"\0" * (21 * 1024 * 1024))
    upload(browser, tmp_path / "huge.jpg")
    wait_for(browser, lambda d: "too large" in element(d, "#error").text)
    assert "the limit is 20 MiB" in element(browser, "#error").text
    # The same page in front of a TorchServe that does not answer.
    down = start_viewer(f"http://127.0.0.1:{free_port()}", server.key_file)
    try:
        (tmp_path / "chelsea.jpg").write_bytes(photos["chelsea"])
        browser.get(down.url)
        upload(browser, tmp_path / "chelsea.jpg")
        wait_for(browser, lambda d: element(d, "#error").is_displayed())
        assert "The model server does not answer. Start it with `make demo`" in element(browser, "#error").text
    finally:
        stop_viewer(down)
