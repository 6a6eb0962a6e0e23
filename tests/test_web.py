"""The web page at ``/`` in a real browser: Playwright driving Debian's Chromium against ``python -m service``.

The server is the real entry point on a free loopback port, serving the trained bundle when
``models/cifar10-resnet`` exists and an untrained test bundle otherwise. Screenshots of every state
land in ``tests/artifacts/`` (ignored by git). Without Playwright or Chromium the module is skipped.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("CAMSERVE_CHROMIUM", "/usr/bin/chromium"))

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
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

from harness import Server, camserve  # noqa: E402  (conftest puts bench/ on sys.path)
from helpers import CLASSES, make_bundle  # noqa: E402  (and tests/)

pytestmark = [pytest.mark.browser, pytest.mark.server]

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


TRAINED = (REAL_BUNDLE / "model.json").is_file()  # else an untrained test bundle is served


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bundle = REAL_BUNDLE if TRAINED else make_bundle(tmp_path_factory.mktemp("web") / "bundle")
    log_path = tmp_path_factory.mktemp("web-log") / "server.log"
    settings = {"torch_threads": 1, "log_requests": "false", "log_level": "warning"}
    with camserve(bundle, log_path, start_timeout_s=90, **settings) as running:
        yield running


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
    # The page's Content-Security-Policy (service/http/answer_headers.py) must not block anything it does.
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => "
        "console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`))"
    )
    page.on(
        "console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text or "CSP" in m.text else None
    )
    page.goto(server.base_url + "/")
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
    if not TRAINED:
        return "cat"
    for name in CLASSES:
        files = [("files", (f"{name}.png", (EXAMPLES / f"{name}.png").read_bytes(), "image/png"))]
        top = httpx.post(f"{server.base_url}/predict?top_k=1", files=files, timeout=30).json()
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
    if TRAINED:
        expect(card.locator(".verdict")).to_contain_text(example_class)
        assert labels[0] == example_class
    shot(page, "01-top-k-bars")


def canvas_rgb(canvas: Locator) -> np.ndarray:
    """The pixels a canvas holds, (H, W, 3), as the page painted them."""
    size, data = canvas.evaluate(
        "c => [[c.height, c.width], Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]"
    )
    return np.array(data, dtype=np.int16).reshape(*size, 4)[..., :3]


def server_overlay(server: Server, example: str, **query: str) -> np.ndarray:
    """The server's own PNG overlay (``format=png``) of a shipped example image."""
    files = [("files", (f"{example}.png", (EXAMPLES / f"{example}.png").read_bytes(), "image/png"))]
    response = httpx.post(f"{server.base_url}/gradcam", params={"format": "png", **query}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def assert_same_overlay(canvas: Locator, server: Server, example: str, **query: str) -> None:
    """The browser's overlay against the server's: equal but where the heatmap's 4-decimal rounding in
    the JSON answer moved a value to the neighbouring colour of the map, which changes a pixel by at
    most the map's largest step between neighbours, times the opacity, plus one for rounding (here
    1-2 levels, never more than 4)."""
    colormap = np.array(httpx.get(f"{server.base_url}/health").json()["gradcam"]["colormap"], dtype=np.int16)
    bound = int(np.ceil(np.abs(np.diff(colormap, axis=0)).max() * float(query["opacity"]))) + 1
    painted, served = canvas_rgb(canvas), server_overlay(server, example, **query)
    assert painted.shape == served.shape == (32, 32, 3)
    difference = np.abs(painted - served)
    assert difference.max() <= bound, f"{example} {query}: off by up to {difference.max()} levels (bound {bound})"
    assert (difference > 0).mean() < 0.02, f"{example} {query}: {(difference > 0).mean():.1%} of values differ"


def test_gradcam_overlay_is_composited_in_the_page_and_the_slider_asks_nothing(page: Page, server: Server) -> None:
    health = httpx.get(f"{server.base_url}/health").json()
    default_layer = health["gradcam"]["default_layer"]
    layer_options = page.locator("#layer option")
    expect(layer_options).to_have_count(len(health["gradcam"]["layers"]))
    expect(page.locator("#layer")).to_have_value(default_layer)
    for row in health["gradcam"]["layers"]:
        expect(page.locator(f'#layer option[value="{row["name"]}"]')).to_contain_text(f"{row['receptive_field']} px")
    gradcam_requests: list[str] = []
    page.on("request", lambda request: gradcam_requests.append(request.url) if "/gradcam" in request.url else None)

    page.click("#all-examples")
    expect(page.locator(".result-card .verdict")).to_have_count(10)
    page.focus("#gradcam-on")  # keyboard: the switch is a focusable checkbox
    page.keyboard.press("Space")
    expect(page.locator("#gradcam-on")).to_be_checked()
    overlays = page.locator(".result-card canvas.overlay")
    expect(overlays).to_have_count(10)
    first, last = overlays.first, overlays.last
    expect(first).to_have_attribute("data-opacity", "0.5")
    assert first.evaluate("c => [c.width, c.height]") == [32, 32]
    assert first.evaluate("c => getComputedStyle(c).imageRendering") == "pixelated"
    assert len(gradcam_requests) == 1, gradcam_requests  # one request for the ten images
    assert_same_overlay(first, server, "airplane", layer=default_layer, opacity="0.5")
    shot(page, "02-gradcam-on")

    page.focus("#opacity")
    page.keyboard.press("End")
    expect(page.locator("#opacity-value")).to_have_text("100%")
    expect(first).to_have_attribute("data-opacity", "1")
    assert_same_overlay(first, server, "airplane", layer=default_layer, opacity="1")
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#opacity-value")).to_have_text("85%")
    expect(last).to_have_attribute("data-opacity", "0.85")
    assert_same_overlay(last, server, "truck", layer=default_layer, opacity="0.85")
    shot(page, "03-gradcam-opacity-85")
    # Longer than any debounce a re-request would sit behind: the slider sent nothing.
    page.wait_for_timeout(750)
    assert len(gradcam_requests) == 1, gradcam_requests

    # The layer and the class to explain do change the answer: those still ask the server.
    other_layer = next(row["name"] for row in health["gradcam"]["layers"] if row["name"] != default_layer)
    with page.expect_request(lambda request: "/gradcam" in request.url) as asked:
        page.select_option("#layer", other_layer)
    assert f"layer={other_layer}" in asked.value.url
    expect(page.locator(".result-card .legend").first).to_contain_text(other_layer)
    assert_same_overlay(first, server, "airplane", layer=other_layer, opacity="0.85")
    with page.expect_request(lambda request: "/gradcam" in request.url) as asked:
        page.select_option("#target", "cat")
    assert "target=cat" in asked.value.url
    expect(page.locator(".result-card .legend").first).to_contain_text("cat")
    assert_same_overlay(first, server, "airplane", layer=other_layer, target="cat", opacity="0.85")
    assert len(gradcam_requests) == 3, gradcam_requests


def test_misclassified_gallery_shows_n_items_with_gradcam(page: Page) -> None:
    page.fill("#gallery-n", "5")
    page.get_by_role("button", name="Show mistakes").click()
    items = page.locator("#gallery .mistake")
    expect(items).to_have_count(5)
    expect(items.first.locator(".mistake-true")).to_contain_text(re.compile("|".join(CLASSES)))
    button = items.first.get_by_role("button", name="Show Grad-CAM")
    button.click()
    expect(items.first.locator("canvas.overlay")).to_have_count(2)
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
    health = httpx.get(f"{server.base_url}/health").json()
    expect(phone.locator("#per-class .bar-row")).to_have_count(len(health["model"]["per_class_accuracy"]))
    expect(phone.locator("#model-facts")).to_contain_text(health["model"]["version"][:12])
    expect(phone.locator("#model-facts")).to_contain_text(f"{health['model']['parameters']:,}")
    expect(phone.locator("#test-accuracy")).to_contain_text("%")
    phone.locator('[data-example="horse"]').click()
    expect(phone.locator(".result-card .bar-row")).to_have_count(3)
    phone.focus("#gradcam-on")
    phone.keyboard.press("Space")
    expect(phone.locator(".result-card canvas.overlay")).to_have_count(1)
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "page scrolls sideways"
    shot(phone, "06-phone")


def test_model_card_draws_the_reliability_diagram(page: Page, server: Server) -> None:
    calibration = httpx.get(f"{server.base_url}/health").json()["model"]["calibration"]
    if calibration is None:  # the untrained test bundle carries no temperature
        expect(page.locator("#calibration")).to_be_hidden()
        return
    served = calibration["test"]["flip"]
    dots = {phase: [b for b in served[phase]["reliability"] if b["count"]] for phase in ("before", "after")}
    expect(page.locator("#reliability-plot .rel-before circle")).to_have_count(len(dots["before"]))
    expect(page.locator("#reliability-plot .rel-after circle")).to_have_count(len(dots["after"]))
    expect(page.locator("#reliability-plot .rel-diagonal")).to_have_count(1)
    expect(page.locator("#reliability-caption")).to_contain_text(f"ECE {100 * served['after']['ece']:.1f}%")
    expect(page.locator("#calibration-head th")).to_have_count(1 + len(calibration["test"]))  # a column per mode
    expect(page.locator("#calibration-body tr")).to_have_count(3)  # ECE, NLL, Brier
    expect(page.locator("#calibration-summary")).to_contain_text(f"{calibration['temperature']:.3f}")
    # Dots run left to right in bin order: confidence on the x axis.
    xs = page.locator("#reliability-plot .rel-after circle").evaluate_all("cs => cs.map(c => +c.getAttribute('cx'))")
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    page.locator("#calibration").scroll_into_view_if_needed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#model-card").screenshot(path=str(ARTIFACTS / "07-reliability.png"))


def test_method_selector_road_score_and_the_road_table(page: Page, server: Server) -> None:
    health = httpx.get(f"{server.base_url}/health").json()
    expect(page.locator("#method option")).to_have_count(len(health["gradcam"]["methods"]))
    page.locator('[data-example="horse"]').click()
    expect(page.locator(".result-card .bar-row")).to_have_count(3)
    page.focus("#gradcam-on")
    page.keyboard.press("Space")
    expect(page.locator(".result-card canvas.overlay")).to_have_count(1)
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
    shot(page, "08-method-and-road")
