"""The studio in a real browser: scripts/studio.py on a free loopback port, the page in headless Chromium.

Selenium drives Debian's `chromium` through its `chromedriver` (both installed by .ci/run); nothing is
downloaded at run time. Skipped where they are missing, unless STUDIO_BROWSER_REQUIRED=1 (CI sets it).
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import soundfile as sf

from helpers import ARTIST, SCRIPTS, add_joint_model, make_root

JOINT = "mix"  # a hand-built model of two artists, listed after ARTIST

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def browser_or_skip():
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "the selenium package"
    else:
        missing = None if CHROMIUM and CHROMEDRIVER else "chromium and chromedriver (apt-get install chromium " \
                                                          "chromium-driver)"
    if missing:
        if os.environ.get("STUDIO_BROWSER_REQUIRED") == "1":
            pytest.fail(f"the browser test must run here but {missing} is missing")
        pytest.skip(f"no browser test: {missing} not installed")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, transformer_module):
    """scripts/studio.py serving a root with a tiny one-artist model and a tiny joint one -> its base URL."""
    tmp_path = tmp_path_factory.mktemp("studio")
    root = make_root(tmp_path / "root", transformer_module, "delay")
    add_joint_model(root, transformer_module, JOINT)
    port = free_loopback_port()
    log = open(tmp_path / "studio.log", "w")
    process = subprocess.Popen([sys.executable, str(SCRIPTS / "studio.py"), "--root", str(root), "--port", str(port),
                                "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process, tmp_path / "studio.log")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def wait_until_serving(base: str, process, log_path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"studio.py exited {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/api/models", timeout=2) as response:
                if json.loads(response.read()):
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"studio.py did not answer in {timeout} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never downloads a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,1100", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def set_field(driver, element_id: str, value) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def generate_short_piece(browser, wait) -> None:
    """Half a second, seed 7, Generate; wait for the piece's player (or an error), which must be none."""
    from selenium.webdriver.common.by import By

    set_field(browser, "seconds", 0.5)
    set_field(browser, "seed", 7)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results audio")
               or driver.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""


def test_generate_in_the_page_then_play_the_wav(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda driver: driver.find_element(By.ID, "artist").get_attribute("value") == ARTIST)
    assert browser.find_element(By.ID, "banner").is_displayed()  # the random codec is untrained
    assert not browser.find_element(By.ID, "cfg_coef").is_displayed()  # a one-artist model: no guidance
    generate_short_piece(browser, wait)
    audio = browser.find_element(By.CSS_SELECTOR, "#results audio")
    source = audio.get_attribute("src")
    assert source.startswith(server)
    with urllib.request.urlopen(source, timeout=10) as response:
        assert response.headers["content-type"] == "audio/wav"
        wave, rate = sf.read(io.BytesIO(response.read()))
    assert rate == 48_000 and wave.shape == (24_000, 2)
    wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#results img").get_property("naturalWidth") > 0)
    assert browser.find_element(By.ID, "status").text.startswith("done 100%")
    wait.until(lambda driver: any(ARTIST in item.text for item in driver.find_elements(By.CSS_SELECTOR, "#history li")))
    assert browser.find_element(By.ID, "error").text == ""
    originality = browser.find_element(By.CSS_SELECTOR, "#results .originality").text  # beside the piece
    assert originality.startswith("No originality report") and "pipeline.originality" in originality
    screenshot = tmp_path / "studio.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:4] == b"\x89PNG"


def test_blend_two_artists_with_guidance_in_the_page(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda driver: driver.find_element(By.ID, "artist").get_attribute("value") == ARTIST)
    assert not browser.find_element(By.ID, "blend").is_displayed()
    Select(browser.find_element(By.ID, "model")).select_by_value(JOINT)
    artists = Select(browser.find_element(By.ID, "artist"))
    assert [option.text for option in artists.options] == ["Low", "High", "(blend of artists)"]
    assert browser.find_element(By.ID, "cfg_coef").is_displayed()
    assert not browser.find_element(By.ID, "blend").is_displayed()
    artists.select_by_value("(blend of artists)")
    assert browser.find_element(By.ID, "blend").is_displayed()
    set_field(browser, "blend_0", 1)
    set_field(browser, "blend_1", 3)
    set_field(browser, "cfg_coef", 2)
    generate_short_piece(browser, wait)
    with urllib.request.urlopen(f"{server}/api/pieces", timeout=10) as response:
        pieces = [piece for piece in json.loads(response.read()) if piece["id"].startswith("blend_Low-0.25_High-0.75:")]
    assert len(pieces) == 1
    with urllib.request.urlopen(f"{server}/api/pieces/{pieces[0]['id']}", timeout=10) as response:
        conditioning = json.loads(response.read())["conditioning"]
    assert conditioning["model"] == JOINT and conditioning["blend"] == {"Low": 0.25, "High": 0.75}
    assert conditioning["cfg_coef"] == 2.0
    set_field(browser, "blend_0", 0)
    set_field(browser, "blend_1", 0)
    browser.find_element(By.ID, "generate").click()  # weights that sum to 0: stage 5's reason, shown
    wait.until(lambda driver: driver.find_element(By.ID, "error").text)
    assert "sum to 0" in browser.find_element(By.ID, "error").text
