"""The web page at ``/`` in a real browser: Playwright driving Debian's Chromium against ``python -m service``.

The server is the real entry point on a free loopback port, serving the trained bundle when
``models/cifar10-resnet`` exists and an untrained test bundle otherwise. Screenshots of every state
land in ``tests/artifacts/`` (ignored by git). Without Playwright or Chromium the module is skipped.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("CAMSERVE_CHROMIUM", "/usr/bin/chromium"))

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip(
        "browser tests need Playwright for Python: `pip install playwright` (no `playwright install`; "
        "Debian's Chromium is used)",
        allow_module_level=True,
    )
if not CHROMIUM.is_file():
    pytest.skip(
        f"browser tests need Chromium at {CHROMIUM}: `apt-get install chromium` (or set CAMSERVE_CHROMIUM)",
        allow_module_level=True,
    )

from helpers import CLASSES, make_bundle  # noqa: E402  (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
EXAMPLES = ROOT / "service" / "static" / "examples"
REAL_BUNDLE = ROOT / "models" / "cifar10-resnet"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000  # generous: the tests share two cores with whatever else runs


class Server:
    def __init__(self, url: str, trained: bool) -> None:
        self.url = url
        self.trained = trained


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    trained = (REAL_BUNDLE / "model.json").is_file()
    bundle = REAL_BUNDLE if trained else make_bundle(tmp_path_factory.mktemp("web") / "bundle")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("web-log") / "server.log"
    env = {
        **os.environ,
        "CAMSERVE_MODEL_DIR": str(bundle),
        "CAMSERVE_HOST": "127.0.0.1",
        "CAMSERVE_PORT": str(port),
        "CAMSERVE_TORCH_THREADS": "1",
        "CAMSERVE_LOG_REQUESTS": "false",
        "CAMSERVE_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`python -m service` exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready within 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, trained)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        except Exception as exc:  # a broken or incompatible Chromium install
            pytest.skip(f"Chromium at {CHROMIUM} did not start under Playwright: {exc}")
        yield browser
        browser.close()


def _open(browser: Browser, server: Server, **context_options) -> Iterator[Page]:
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    # The model card fills in from /health: the page is wired up and the service is ready.
    expect(page.locator("#service-status")).to_have_attribute("data-state", "ready")
    yield page
    context.close()
    assert not errors, f"uncaught JavaScript errors: {errors}"


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    yield from _open(browser, server)


@pytest.fixture
def phone(browser: Browser, server: Server) -> Iterator[Page]:
    yield from _open(
        browser,
        server,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        color_scheme="dark",
    )


@pytest.fixture(scope="module")
def example_class(server: Server) -> str:
    """An example image's class; with the trained bundle, one the model classifies correctly."""
    if not server.trained:
        return "cat"
    for name in CLASSES:
        files = [("files", (f"{name}.png", (EXAMPLES / f"{name}.png").read_bytes(), "image/png"))]
        top = httpx.post(f"{server.url}/predict?top_k=1", files=files, timeout=30).json()
        if top["predictions"][0]["top_k"][0]["label"] == name:
            return name
    pytest.fail("the trained bundle misclassifies every shipped example image")


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header then sits at the top of a full-page shot
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_upload_shows_top_k_bars_with_the_right_label(page: Page, server: Server, example_class: str) -> None:
    page.select_option("#top-k", "5")
    page.set_input_files("#file-input", str(EXAMPLES / f"{example_class}.png"))
    card = page.locator(".result-card")
    expect(card).to_have_count(1)
    rows = card.locator(".bar-row")
    expect(rows).to_have_count(5)
    labels = rows.locator(".bar-label").all_inner_texts()
    assert len(set(labels)) == 5 and set(labels) <= set(CLASSES)
    for text in rows.locator(".bar-pct").all_inner_texts():
        assert re.fullmatch(r"\d{1,3}\.\d%", text), text
    widths = rows.locator(".bar-fill").evaluate_all("els => els.map(e => parseFloat(e.style.width))")
    assert widths == sorted(widths, reverse=True)
    expect(card.locator(".result-title h3")).to_have_text(f"{example_class}.png")
    if server.trained:
        expect(card.locator(".verdict")).to_contain_text(example_class)
        assert labels[0] == example_class
    shot(page, "01-top-k-bars")


def test_gradcam_overlay_appears_and_follows_opacity(page: Page, server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    layer_options = page.locator("#layer option")
    expect(layer_options).to_have_count(len(health["gradcam"]["layers"]))
    expect(page.locator("#layer")).to_have_value(health["gradcam"]["default_layer"])
    for row in health["gradcam"]["layers"]:
        expect(page.locator(f'#layer option[value="{row["name"]}"]')).to_contain_text(f"{row['receptive_field']} px")

    page.click("#all-examples")
    expect(page.locator(".result-card .verdict")).to_have_count(10)
    page.focus("#gradcam-on")  # keyboard: the switch is a focusable checkbox
    page.keyboard.press("Space")
    expect(page.locator("#gradcam-on")).to_be_checked()
    overlays = page.locator(".result-card img.overlay")
    expect(overlays).to_have_count(10)
    first = overlays.first
    expect(first).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    assert first.evaluate("img => img.complete && img.naturalWidth") == 32
    assert first.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    before = first.get_attribute("src")
    shot(page, "02-gradcam-on")

    page.focus("#opacity")
    page.keyboard.press("End")
    expect(page.locator("#opacity-value")).to_have_text("100%")
    expect(page.locator(".result-card img.overlay").first).not_to_have_attribute("src", before)
    shot(page, "03-gradcam-opacity-100")


def test_misclassified_gallery_shows_n_items_with_gradcam(page: Page) -> None:
    page.fill("#gallery-n", "5")
    page.get_by_role("button", name="Show mistakes").click()
    items = page.locator("#gallery .mistake")
    expect(items).to_have_count(5)
    expect(items.first.locator(".mistake-true")).to_contain_text(re.compile("|".join(CLASSES)))
    button = items.first.get_by_role("button", name="Show Grad-CAM")
    button.click()
    expect(items.first.locator("img.overlay")).to_have_count(2)
    expect(items.first.get_by_role("button", name="Hide Grad-CAM")).to_have_attribute("aria-expanded", "true")
    shot(page, "04-misclassified")


def test_text_file_shows_the_services_error_in_words(page: Page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n")
    page.set_input_files("#file-input", str(notes))
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("could not be read as an image")
    expect(alert).to_contain_text("notes.txt: not an image (unrecognised data)")
    expect(alert).to_contain_text("HTTP 400")
    expect(page.locator("#results")).to_contain_text("No results")
    shot(page, "05-error-not-an-image")


def test_model_card_and_phone_layout(phone: Page, server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    expect(phone.locator("#per-class .bar-row")).to_have_count(len(health["model"]["per_class_accuracy"]))
    expect(phone.locator("#model-facts")).to_contain_text(health["model"]["version"][:12])
    expect(phone.locator("#model-facts")).to_contain_text(f"{health['model']['parameters']:,}")
    expect(phone.locator("#test-accuracy")).to_contain_text("%")
    phone.locator('[data-example="horse"]').click()
    expect(phone.locator(".result-card .bar-row")).to_have_count(3)
    phone.focus("#gradcam-on")
    phone.keyboard.press("Space")
    expect(phone.locator(".result-card img.overlay")).to_have_count(1)
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "page scrolls sideways"
    shot(phone, "06-phone")


def test_method_selector_road_score_and_the_road_table(page: Page, server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    expect(page.locator("#method option")).to_have_count(len(health["gradcam"]["methods"]))
    page.locator('[data-example="horse"]').click()
    expect(page.locator(".result-card .bar-row")).to_have_count(3)
    page.focus("#gradcam-on")
    page.keyboard.press("Space")
    expect(page.locator(".result-card img.overlay")).to_have_count(1)
    page.select_option("#method", "layercam")
    page.check("#road-on")
    expect(page.locator(".result-card .road-score")).to_contain_text(re.compile(r"ROAD faithfulness -?\d\.\d{3}"))
    expect(page.locator(".result-card figcaption.legend")).to_contain_text("LayerCAM")
    table = health["gradcam"]["faithfulness"]
    if table:
        expect(page.locator("#faithfulness-body tr")).to_have_count(len(table["road"]))
        expect(page.locator("#faithfulness-help")).to_contain_text(f"{table['images']:,} test images")
    else:
        expect(page.locator("#faithfulness-section")).to_be_hidden()
    shot(page, "07-method-and-road")
