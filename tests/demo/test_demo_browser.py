"""End to end in headless Chromium (Selenium + Debian's chromium/chromium-driver): the page shows the predictor's
boxes, the other tasks' results and clear error messages. Screenshots go to ``test-artifacts/demo/``.

Install the browser with ``apt-get install -y chromium chromium-driver``; without it these tests are skipped.
"""

# selenium's names are imported in a try block: every test here is skipped when that import fails
# pyright: reportPossiblyUnboundVariable=false

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fiber_heads.grounding import PostprocessConfig
from fiber_train.demo import BackendSet, create_server, load_backends
from fiber_train.demo.defaults import sample_images
from fiber_train.predictor import GroundingPredictor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_SELENIUM, reason="selenium is not installed (pip install -r requirements-dev.txt)"),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Chromium is not installed (apt-get install -y chromium chromium-driver)",
    ),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "demo"
DOWNLOADS = ARTIFACTS / "downloads"
SHOWN = 5  # the page's default "Boxes shown"


@pytest.fixture(scope="module")
def backends(demo_backends: BackendSet) -> BackendSet:
    return demo_backends


@pytest.fixture(scope="module")
def server(backends: BackendSet) -> Iterator[Any]:
    srv = create_server(backends, port=0, max_upload_mb=0.05)
    srv.start_background()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    shutil.rmtree(DOWNLOADS, ignore_errors=True)
    DOWNLOADS.mkdir(parents=True)
    assert CHROMIUM is not None and CHROMEDRIVER is not None  # the module is skipped without them
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(DOWNLOADS), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver: Any, condition: Any, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 5)


def run_task(driver: Any, task: str, text: str | None) -> None:
    """Choose ``task``, type ``text``, press Run and wait for a result or an error."""
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    box = driver.find_element(By.ID, "text")
    if text is not None:
        box.clear()
        box.send_keys(text)
    driver.execute_script("document.getElementById('raw-json').textContent = ''")
    driver.find_element(By.ID, "run").click()
    wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "raw-json").get_attribute("textContent")
            or d.find_element(By.ID, "error").is_displayed()
        ),
    )


def upload(driver: Any, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))


def error_text(driver: Any) -> str:
    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def scene(path: Path) -> Path:
    """A non-square synthetic scene (96 x 64: a swap of x and y would show) written by the test."""
    im = Image.new("RGB", (96, 64), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    draw.ellipse((8, 8, 30, 30), fill=(230, 25, 75))
    draw.rectangle((56, 30, 84, 58), fill=(0, 130, 200))
    draw.polygon([(40, 60), (50, 40), (60, 60)], fill=(60, 180, 75))
    im.save(path)
    return path


def severe_console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_grounding_boxes_on_the_page_match_the_predictor(
    browser: Any, server: Any, demo_runs: dict[str, Path], tmp_path: Path
) -> None:
    image_path = scene(tmp_path / "scene.png")
    open_page(browser, server.url)
    upload(browser, image_path)
    wait(browser, lambda d: d.execute_script("return document.getElementById('preview').naturalWidth") == 96)
    run_task(browser, "grounding", "the red circle")
    assert error_text(browser) == ""

    predictor = GroundingPredictor.from_run(demo_runs["fine"])
    image = Image.open(image_path).convert("RGB")
    ref = predictor.ground([image], ["the red circle"], config=PostprocessConfig.referring_expressions())[0]
    assert len(ref) > SHOWN

    rects = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")
    assert len(rects) == SHOWN
    drawn = np.array(
        [[float(r.get_attribute(a)) for a in ("x", "y", "width", "height")] for r in rects], dtype=np.float64
    )
    expected = ref.boxes[:SHOWN].double().numpy()
    expected = np.concatenate([expected[:, :2], expected[:, 2:] - expected[:, :2]], axis=1)  # xyxy -> xywh
    np.testing.assert_allclose(drawn, expected, atol=0.011)
    scores = [float(r.get_attribute("data-score")) for r in rects]
    np.testing.assert_allclose(scores, ref.scores[:SHOWN].numpy(), atol=1e-4)
    assert [r.get_attribute("data-phrase") for r in rects] == ["the red circle"] * SHOWN
    # the overlay maps image pixels onto the displayed image
    view_box = browser.execute_script("return document.getElementById('overlay').getAttribute('viewBox')")
    assert view_box == "0 0 96 64"
    rows = browser.find_elements(By.CSS_SELECTOR, "#boxes-table tbody tr")
    assert len(rows) == SHOWN
    assert browser.find_element(By.ID, "box-summary").text == f"{len(ref)} boxes predicted; showing {SHOWN}."

    # the downloadable JSON holds every box, equal to the predictor's
    result = json.loads(browser.find_element(By.ID, "raw-json").get_attribute("textContent"))
    np.testing.assert_allclose([b["box"] for b in result["boxes"]], ref.boxes.numpy(), atol=0.006)
    assert result["image"] == {"width": 96, "height": 64, "name": "scene.png"}
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "fiber-demo-grounding.json"
    assert link.get_attribute("href").startswith("blob:")
    link.click()
    saved = DOWNLOADS / "fiber-demo-grounding.json"
    wait(browser, lambda d: saved.is_file() and saved.stat().st_size > 0)
    assert json.loads(saved.read_text()) == result

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "grounding.png"))
    assert severe_console_errors(browser) == []


def test_other_tasks_are_shown(browser: Any, server: Any, backends: BackendSet, demo_world: Path) -> None:
    open_page(browser, server.url)
    browser.find_element(By.CSS_SELECTOR, ".samples button[data-index='0']").click()
    wait(browser, lambda d: d.execute_script("return document.getElementById('preview').naturalWidth") > 0)
    image = Image.open(sample_images(demo_world)[0]).convert("RGB")

    run_task(browser, "vqa", "what color is the circle?")
    direct = backends.run("vqa", image, "what color is the circle?")
    cells = [
        r.find_elements(By.TAG_NAME, "td") for r in browser.find_elements(By.CSS_SELECTOR, "#answers-table tbody tr")
    ]
    assert [c[0].text for c in cells] == [a["answer"] for a in direct["answers"]]
    assert [c[1].text for c in cells] == [f"{a['score']:.3f}" for a in direct["answers"]]

    run_task(browser, "caption", None)
    assert browser.find_element(By.ID, "text").get_attribute("disabled") is not None
    caption = backends.run("caption", image, "")["caption"]
    assert browser.find_element(By.ID, "caption-out").text == (caption or "(empty caption)")

    run_task(browser, "scoring", "a red circle\na blue square")
    direct = backends.run("scoring", image, "a red circle\na blue square")
    rows = browser.find_elements(By.CSS_SELECTOR, "#scores-table tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [f"{c['itm']:.3f}" for c in direct["captions"]]
    assert "best" in rows[direct["best"]].get_attribute("class")
    browser.save_screenshot(str(ARTIFACTS / "scoring.png"))
    assert severe_console_errors(browser) == []


def test_bad_input_shows_a_message_and_the_page_keeps_working(browser: Any, server: Any, tmp_path: Path) -> None:
    open_page(browser, server.url)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    upload(browser, notes)
    run_task(browser, "grounding", "a circle")
    assert "notes.txt: not an image" in error_text(browser)
    browser.save_screenshot(str(ARTIFACTS / "error-not-an-image.png"))

    # larger than the 0.05 MB limit: refused in the page before any upload
    noisy = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noisy)
    upload(browser, noisy)
    wait(browser, lambda d: "noise.png: the file is" in error_text(d))
    assert "MB are accepted" in error_text(browser)

    browser.find_element(By.CSS_SELECTOR, ".samples button[data-index='1']").click()
    wait(browser, lambda d: d.execute_script("return document.getElementById('preview').naturalWidth") > 0)
    run_task(browser, "grounding", "")
    assert "the caption is empty" in error_text(browser)
    run_task(browser, "detection", " , ")
    assert "at least one class name" in error_text(browser)

    run_task(browser, "grounding", "a blue square")
    assert error_text(browser) == ""
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")) == SHOWN


def test_task_missing_from_the_checkpoint(browser: Any, demo_runs: dict[str, Path], demo_world: Path) -> None:
    srv = create_server(load_backends([demo_runs["fine"]], samples=sample_images(demo_world)), port=0)
    srv.start_background()
    try:
        open_page(browser, srv.url)
        labels = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#task option")]
        assert labels[:2] == ["Phrase grounding", "Detection (class names)"]
        assert labels[2] == "Visual question answering (not available)"
        Select(browser.find_element(By.ID, "task")).select_by_value("vqa")
        note = browser.find_element(By.ID, "task-note")
        assert note.is_displayed() and note.text.startswith("Not available in this checkpoint:")
        browser.find_element(By.CSS_SELECTOR, ".samples button[data-index='0']").click()
        run_task(browser, "vqa", "what color?")
        assert "Visual question answering is not available in this checkpoint" in error_text(browser)
        browser.save_screenshot(str(ARTIFACTS / "unavailable-task.png"))
    finally:
        srv.stop()
