"""End to end in a real browser: `streamlit run app` driven by headless Chromium through selenium.

demo loads → headline metrics visible → a model dropped into the candidate slot → the Errors page
shows its Grad-CAM overlays → the report zip downloads and holds the bundle (with that model).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skips cleanly without them.
Nothing is downloaded: the driver is /usr/bin/chromedriver and Selenium Manager stays offline.
On failure a screenshot is saved to a temporary file and its path printed, with the server's log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
STARTUP_TIMEOUT = 60  # seconds for the server to answer its health check
STEP_TIMEOUT = 120  # seconds for one step (the first page imports TensorFlow and predicts the demo sample)

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`streamlit run app` on a free local port; yields its URL, then stops it."""
    import analysis.__main__ as cli

    if not all((cli.DEMO_MODELS / f"age_gender_{key}.keras").exists() for key in "AB"):
        pytest.skip("models/demo/ has no demo models (python -m training demo)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = dict(os.environ, FACECHECK_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, server, log_path)
        yield url, log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for_health(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit did not answer within {STARTUP_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium with a fresh profile and a download folder; yields (driver, download dir)."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def candidate_model(tmp_path_factory) -> Path:
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = {"age": keras.layers.Dense(1, name="age")(x), "gender": keras.layers.Dense(1, activation="sigmoid", name="gender")(x)}
    path = tmp_path_factory.mktemp("candidate") / "browser_candidate.keras"
    keras.Model(inputs, outputs).save(path)
    return path


# ---------------------------------------------------------------- page helpers


def _wait(driver, condition, what: str, timeout: float = STEP_TIMEOUT):
    """Poll `condition(driver)` until it is truthy. Streamlit redraws elements on every rerun, so an
    element found a moment ago can be gone: such stale references just mean "try again"."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    retry = (StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=retry).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


def _click(driver, css: str, what: str, timeout: float = STEP_TIMEOUT, send_file: Path | None = None) -> None:
    """Click the first element matching `css` (or give a file input `send_file`) once the app is
    idle, retrying while it is redrawn."""

    def clicked(d) -> bool:
        found = _elements(d, css)
        if not found or not _idle(d):
            return False
        if send_file is not None:
            found[0].send_keys(str(send_file))
        else:
            found[0].click()
        return True

    _wait(driver, clicked, what, timeout)


def _idle(driver) -> bool:
    """True when the script run finished (no "running" indicator) and no exception is shown."""
    from selenium.webdriver.common.by import By

    exceptions = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    if exceptions:
        raise AssertionError(f"the app shows an exception: {exceptions[0].text[:2000]}")
    return not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')


def _elements(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _open_page(driver, title: str) -> None:
    """Click a page in the top navigation (a new URL would start a new session)."""
    from selenium.webdriver.common.by import By

    def find_link(d):
        links = d.find_elements(By.CSS_SELECTOR, '[data-testid="stTopNavLink"]')
        return next((a for a in links if a.text.strip().splitlines()[-1:] == [title]), None)  # text: icon name, title

    _wait(driver, lambda d: _idle(d) and find_link(d) is not None and (find_link(d).click() or True), f"the {title} link")
    _wait(driver, lambda d: any(h.text == title for h in d.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] h1')), f"the {title} page")


def _loaded_images(driver, caption: str) -> int:
    """How many images with this caption are fully loaded."""
    count = 0
    for figure in _elements(driver, '[data-testid="stImage"], [data-testid="stFullScreenFrame"]'):
        if caption in figure.text:
            for image in figure.find_elements("css selector", "img"):
                if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image):
                    count += 1
    return count


# ---------------------------------------------------------------- the journey


def test_demo_upload_gradcam_and_export_in_a_real_browser(app_url, browser, candidate_model):
    url, log_path = app_url
    driver, downloads = browser
    try:
        driver.get(url)
        # 1. The demo opens on the Overview with headline metrics for both models.
        _wait(driver, lambda d: len(_elements(d, '[data-testid="stMetric"]')) >= 4 and _idle(d), "the headline metrics")
        page = _text(driver)
        assert "This is the built-in demo" in page and "Gender accuracy" in page and "Age MAE" in page

        # 2. A model dropped into the candidate slot becomes model B.
        _click(driver, ".st-key-candidate_0 input[type=file]", "the candidate drop zone", send_file=candidate_model)
        _wait(driver, lambda d: "Candidate browser_candidate.keras is model B" in _text(d) and _idle(d), "the candidate to load")
        # The sidebar's model heading can re-render just after the page goes idle: wait for it too.
        _wait(driver, lambda d: "Model B · browser_candidate.keras" in _text(d), "model B's heading to name the candidate")

        # 3. The Errors page shows Grad-CAM overlays for both models.
        _open_page(driver, "Errors")
        _wait(driver, lambda d: _loaded_images(d, "B: Grad-CAM") >= 1 and _loaded_images(d, "A: Grad-CAM") >= 1 and _idle(d),
              "Grad-CAM overlays")  # fmt: skip

        # 4. Export: build the bundle and download the zip.
        _open_page(driver, "Export")
        # The Grad-CAM grids are already tested on the Errors page; leaving them out halves the build.
        _click(driver, ".st-key-bundle_gradcam label", "the Grad-CAM toggle")
        _wait(driver, lambda d: _elements(d, ".st-key-bundle_gradcam input:not(:checked)") and _idle(d), "the toggle to apply")
        _click(driver, ".st-key-build_bundle button", "the build button")
        _click(driver, ".st-key-download_bundle button", "the download button")
        target = downloads / "facecheck_report.zip"
        _wait(driver, lambda d: target.exists() and not list(downloads.glob("*.crdownload")), "the download to finish", timeout=60)
        with zipfile.ZipFile(target) as archive:
            names = archive.namelist()
            assert any(n.endswith("provenance.json") for n in names), names
            assert any(n.endswith("tables/slices.csv") for n in names), names
            assert any(n.endswith("figures/overall.png") for n in names), names
            models_json = archive.read(next(n for n in names if n.endswith("models.json"))).decode()
        assert "browser_candidate.keras" in models_json  # the bundle is this session's evaluation
    except BaseException:
        shot = Path(tempfile.mkstemp(prefix="facecheck-browser-", suffix=".png")[1])
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot of the failure: {shot}\nserver log ({log_path}):\n{log_path.read_text()[-3000:]}")
        raise
