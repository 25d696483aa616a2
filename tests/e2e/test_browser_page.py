"""The page at / in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`
packages) driven by Selenium, against the real server on a free port.

`make test-deps` installs the browser. Under CI=true a missing browser fails these tests instead
of skipping them. One browser serves every test here (Chromium is heavy on a small machine).

Artifacts: a screenshot of the page with its boxes goes to $DETR_TEST_ARTIFACTS (default
test-artifacts/ at the repository root); DETR_UPDATE_DEMO=1 also rewrites docs/demo.png, the
README's picture.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from scripts.bench.serverproc import RunningServer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-640x480.jpg"
# What the page asks of the server (app/web/app.js FETCH_THRESHOLD, FETCH_MAX_DETECTIONS).
FETCH_THRESHOLD = 0.05
FETCH_MAX_DETECTIONS = 300
WAIT_S = 60
KEY = "browser-test-key"


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = (
        f"none of {', '.join(names)} is on PATH: `make test-deps` installs Debian's chromium "
        "and chromium-driver packages"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium = _binary("chromium", "chromium-browser")
    driver_path = _binary("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    # The system driver, named: Selenium Manager never looks for (or downloads) one.
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """The committed default model: real shapes, real boxes."""
    srv = RunningServer(["--workers", "1"], env={"DETR_SERVE_TORCH_THREADS": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def key_server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        ["--model", str(tiny_model_dir), "--workers", "1"],
        env={"DETR_SERVE_TORCH_THREADS": "1", "DETR_SERVE_API_KEY": KEY},
    )
    yield srv
    srv.stop()


def _wait(driver: webdriver.Chrome, condition, what: str):  # type: ignore[no-untyped-def]
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"timed out waiting for {what}; error box: {error!r}; status: {status!r}")


def _open(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element(By.ID, "model").text.startswith("Model "), "the model")


def _upload(driver: webdriver.Chrome, path: Path) -> None:
    """Choose `path` in the file input and wait for the request to be answered."""
    answered = "return Number(document.body.dataset.answered || 0)"
    before = driver.execute_script(answered)
    driver.find_element(By.ID, "file").send_keys(str(path))
    _wait(driver, lambda d: d.execute_script(answered) > before, "the answer")


def _drawn(driver: webdriver.Chrome) -> int:
    boxes = int(driver.find_element(By.ID, "canvas").get_attribute("data-boxes") or -1)
    listed = len(driver.find_elements(By.CSS_SELECTOR, "#detections li"))
    assert boxes == listed, (boxes, listed)
    return boxes


def _detect_count(server: RunningServer, threshold: float, **headers: str) -> int:
    r = httpx.post(
        server.url + "/v1/detect",
        files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(), "image/jpeg")},
        data={"threshold": str(threshold), "max_detections": str(FETCH_MAX_DETECTIONS)},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return len(r.json()["results"][0]["detections"])


def _slider(driver: webdriver.Chrome) -> float:
    return float(driver.find_element(By.ID, "threshold").get_attribute("value"))


def test_page_draws_what_detect_answers_and_the_slider_filters_it(
    browser: webdriver.Chrome, server: RunningServer
) -> None:
    _open(browser, server.url)
    model = browser.find_element(By.ID, "model").text
    assert "rtdetr-shapes" in model and "cpu" in model, model
    toggles = browser.find_elements(By.CSS_SELECTOR, "#classes input[type=checkbox]")
    assert len(toggles) == 5  # circle, square, triangle, star, cross

    _upload(browser, EXAMPLE)
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert _slider(browser) == 0.5
    at_half = _drawn(browser)
    assert at_half == _detect_count(server, 0.5)
    assert at_half > 0

    # Keyboard on the slider: 20 steps of 0.01 down, then to its top.
    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(*[Keys.ARROW_LEFT] * 20)
    assert _slider(browser) == pytest.approx(0.3)
    at_lower = _drawn(browser)
    assert at_lower == _detect_count(server, 0.3)
    slider.send_keys(Keys.END)
    assert _slider(browser) == 1.0
    assert _drawn(browser) == _detect_count(server, 1.0)
    slider.send_keys(Keys.HOME)
    assert _slider(browser) == FETCH_THRESHOLD
    everything = _drawn(browser)
    assert everything == _detect_count(server, FETCH_THRESHOLD)
    assert everything > at_half  # the JSON at 0.05 holds more than at 0.5: the slider shows it

    # A class toggle hides that class's boxes and no other (space bar on the checkbox).
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#detections li")]
    circles = sum(1 for text in items if text.startswith("circle "))
    toggles[0].send_keys(Keys.SPACE)
    assert _drawn(browser) == everything - circles
    toggles[0].send_keys(Keys.SPACE)
    assert _drawn(browser) == everything

    timings = browser.find_element(By.ID, "timings").text
    for stage in ("decode", "queue", "inference", "postprocess"):
        assert stage in timings, timings

    slider.send_keys(*[Keys.ARROW_RIGHT] * 45)  # back to 0.50 for the picture
    assert _slider(browser) == 0.5
    _screenshot(browser, "page-with-boxes.png")


def test_page_is_usable_by_keyboard_and_at_phone_width(
    browser: webdriver.Chrome, server: RunningServer
) -> None:
    _open(browser, server.url)
    # Tab from the top reaches every control, in order, with nothing but the keyboard.
    browser.find_element(By.TAG_NAME, "body").click()
    seen = []
    for _ in range(6):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(browser.switch_to.active_element.get_attribute("id"))
    assert seen[:3] == ["file", "url", "detect"], seen
    # The URL path by keyboard: an address the server refuses is reported, not swallowed.
    url_box = browser.find_element(By.ID, "url")
    url_box.send_keys("http://127.0.0.1:9/no-such-picture.jpg", Keys.ENTER)
    _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), "the URL's error")
    assert "(400)" in browser.find_element(By.ID, "error").text

    browser.set_window_size(390, 844)  # a phone
    try:
        _open(browser, server.url)
        _upload(browser, EXAMPLE)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than a phone"
        canvas = browser.find_element(By.ID, "canvas").rect
        assert canvas["width"] <= 390 and canvas["height"] > 100
        _screenshot(browser, "page-phone-width.png")
    finally:
        browser.set_window_size(1280, 1000)


def test_page_shows_the_apis_error_for_a_file_that_is_not_an_image(
    browser: webdriver.Chrome, server: RunningServer, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a picture\n")
    _open(browser, server.url)
    _upload(browser, notes)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("The server could not use this input (400)"), error.text
    assert "image 0: not an image in a supported format" in error.text, error.text
    assert browser.find_element(By.ID, "detect").is_enabled()  # busy state cleared


def test_page_asks_for_the_api_key_and_works_with_it(
    browser: webdriver.Chrome, key_server: RunningServer
) -> None:
    browser.execute_script("sessionStorage.clear()")
    browser.get(key_server.url + "/")  # the page itself needs no key
    key_row = browser.find_element(By.ID, "key-row")
    assert key_row.is_displayed()
    _wait(browser, lambda d: "(401)" in d.find_element(By.ID, "model").text, "the 401")

    _upload(browser, EXAMPLE)  # without the key: the API's 401, in words
    error = browser.find_element(By.ID, "error").text
    assert "needs an API key" in error and "missing or wrong API key" in error, error

    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # change event
    _wait(browser, lambda d: d.find_element(By.ID, "model").text.startswith("Model "), "the model")
    _upload(browser, EXAMPLE)
    assert not browser.find_element(By.ID, "error").is_displayed()
    expected = _detect_count(key_server, 0.5, Authorization=f"Bearer {KEY}")
    assert _drawn(browser) == expected


def _screenshot(driver: webdriver.Chrome, name: str) -> None:
    folder = Path(os.environ.get("DETR_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path)), path
    assert path.read_bytes().startswith(b"\x89PNG")
    if name == "page-with-boxes.png" and os.environ.get("DETR_UPDATE_DEMO") == "1":
        shutil.copyfile(path, ROOT / "docs" / "demo.png")
