"""Issue 15: the web page as a photo app, in a real chromium against a real `python api.py`.

Budgets under network throttling (Chrome DevTools Protocol, Network.emulateNetworkConditions): "slow 4G"
here is 400 ms latency, 400 kbit/s down and 400 kbit/s up (50 KB/s each way), harsher than the
conditions the issue measured (its 929 KB answer took 5 s, i.e. about 1.5 Mbit/s).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from api_server import ApiServer
from conftest import make_settings
from PIL import Image, ImageOps
from test_ui_browser import ARTIFACTS, TIMEOUT_MS, browser, card_ids, turn_page, ui_url, wait_for_search

from image_retrieval import ImageRetrieval

__all__ = ["browser"]  # the module-scoped chromium fixture of test_ui_browser.py

PHOTOS = 60
DUPLICATES = 2  # exact copies of the first photo, folded into it by the duplicate collapse
SLOW_4G = {"offline": False, "latency": 400, "downloadThroughput": 50_000, "uploadThroughput": 50_000}
ANSWER_BUDGET_BYTES = 40_000
PAINT_BUDGET_MS = 1500
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 860}
VISIBLE_PHOTOS_LOADED = """() => [...document.querySelectorAll('#grid .card img')]
    .filter(img => img.getBoundingClientRect().top < innerHeight)
    .every(img => img.complete && img.naturalWidth)"""


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory, coco_source) -> tuple[Path, list[dict]]:
    """Sixty photos of mixed shapes (some cropped upright or wide), two exact copies of the first."""
    source, annotations = coco_source
    dataset = tmp_path_factory.mktemp("photo-app") / "dataset"
    dataset.mkdir()
    records = []
    for index in range(PHOTOS):
        annotation = annotations[index % len(annotations)]
        photo = Image.open(source / annotation["image"]).convert("RGB")
        if index >= len(annotations):
            photo = ImageOps.mirror(photo)
        if index % 5 == 1:
            photo = ImageOps.fit(photo, (300, 450))
        elif index % 5 == 3:
            photo = ImageOps.fit(photo, (600, 300))
        name = f"photo-{index:02d}.jpg"
        photo.save(dataset / name, quality=90)
        records.append(
            {"path": name, "description": annotation["captions"][0], "tags": annotation["categories"]}
        )
    for copy in range(DUPLICATES):
        shutil.copy(dataset / "photo-00.jpg", dataset / f"copy-{copy}.jpg")
    return dataset, records


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, photo_dataset) -> Iterator[ApiServer]:
    dataset, records = photo_dataset
    settings = make_settings(tmp_path_factory.mktemp("photo-app-index"), dataset, tiny_checkpoint)
    settings = settings.with_overrides(RATE_LIMIT_PER_MINUTE=0)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        engine.import_metadata(records)
        assert engine.count() == PHOTOS + DUPLICATES
    with ApiServer(settings) as api:
        yield api


@pytest.fixture
def open_page(browser, request):
    """open_page(viewport=..., dark=...) -> a fresh page; screenshots land in tests/artifacts/."""
    contexts = []
    errors: list[str] = []

    def make(viewport: dict = DESKTOP, dark: bool = False):
        context = browser.new_context(viewport=viewport, color_scheme="dark" if dark else "light")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"photo_app_{name}.png"))


def search_for(page, server: ApiServer, text: str, **params: str) -> None:
    wait_for_search(page, lambda: page.goto(ui_url(server, q=text, **params)))


def boxes(page, selector: str) -> list[dict]:
    return page.locator(selector).evaluate_all(
        "nodes => nodes.map(n => { const r = n.getBoundingClientRect(); return {left: r.left, top: r.top,"
        " right: r.right, bottom: r.bottom, width: r.width, height: r.height}; })"
    )


def header_bottom(page) -> float:
    return page.evaluate("document.querySelector('.topbar').getBoundingClientRect().bottom")


# -- thumbnails by URL, budgets on slow 4G -------------------------------------------------------


def test_fifty_results_on_slow_4g_small_answer_fast_first_paint_cached_thumbnails(open_page, server):
    page = open_page()
    page.goto(ui_url(server, top_k=50))
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    fetched: list[str] = []
    cdp.on(
        "Network.responseReceived",
        lambda event: (
            fetched.append(event["response"]["url"])
            if "/thumbnails/" in event["response"]["url"]
            and event["response"]["status"] == 200
            and not event["response"].get("fromDiskCache")
            and not event["response"].get("fromMemoryCache")
            else None
        ),
    )
    cdp.send("Network.emulateNetworkConditions", SLOW_4G)
    page.fill("#query", "a dog on a beach")
    page.evaluate(
        """() => {
            window.__paint = {};
            document.querySelector("#query").addEventListener("keydown", (event) => {
                if (event.key === "Enter") window.__paint.enter = performance.now();
            });
            new MutationObserver(() => {
                if (window.__paint.cards || !document.querySelector("#grid .card")) return;
                requestAnimationFrame(() => requestAnimationFrame(() => {
                    window.__paint.cards = performance.now();
                    const first = document.querySelector("#grid .card-button");
                    if (getComputedStyle(first).backgroundImage.startsWith('url("data:image/jpeg')) {
                        window.__paint.photo = window.__paint.photo || window.__paint.cards;
                    }
                }));
            }).observe(document.querySelector("#grid"), {childList: true});
            document.querySelector("#grid").addEventListener("load", () => {
                window.__paint.photo = window.__paint.photo || performance.now();
            }, true);
        }"""
    )
    with page.expect_response(lambda response: response.url.endswith("/search")) as answer:
        page.press("#query", "Enter")
    body = answer.value.body()
    page.wait_for_function("() => window.__paint.cards && window.__paint.photo", timeout=60000)
    paint = page.evaluate("window.__paint")
    cards_ms, photo_ms = paint["cards"] - paint["enter"], paint["photo"] - paint["enter"]
    results = json.loads(body)["results"]
    print(f"slow 4G: answer {len(body)} bytes for {len(results)} results; cards painted {cards_ms:.0f} ms,")
    print(f"first photo {photo_ms:.0f} ms after Enter")
    assert len(results) == 50 and all("image" not in hit for hit in results)
    assert len(body) <= ANSWER_BUDGET_BYTES
    assert cards_ms <= PAINT_BUDGET_MS
    # The first photos are painted from the tiny previews inline in the answer, before any thumbnail.
    assert photo_ms <= PAINT_BUDGET_MS
    assert all(hit["preview"].startswith("data:image/jpeg") for hit in results[:8])
    assert all("preview" not in hit for hit in results[8:])
    first = page.locator("#grid .card img").first
    assert first.get_attribute("loading") == "lazy"
    assert first.get_attribute("src") == f"{server.url}{results[0]['thumbnail_url']}"
    assert page.locator("#status").inner_text().startswith(f"Results 1–50 of {PHOTOS}")
    inline = requests.post(
        f"{server.url}/search", json={"query": "a dog on a beach", "top_k": 50}, timeout=60
    )
    assert all(hit["image"].startswith("data:image/jpeg") for hit in inline.json()["results"])
    print(f"the same answer with inline thumbnails (other apps may still ask): {len(inline.content)} bytes")

    cdp.send("Network.emulateNetworkConditions", {**SLOW_4G, "latency": 0, "downloadThroughput": -1})
    page.wait_for_function(VISIBLE_PHOTOS_LOADED)
    for _ in range(50):  # the network events come over CDP, a little after the pictures show
        if len(fetched) >= 10:
            break
        page.wait_for_timeout(100)
    loaded = len(fetched)
    assert loaded == len(set(fetched)) >= 10
    wait_for_search(page, lambda: page.click("label[for=mode-hybrid]"))
    page.wait_for_function(VISIBLE_PHOTOS_LOADED)
    again = [url for url in fetched[loaded:] if url in fetched[:loaded]]
    assert not again, f"thumbnails downloaded twice instead of from the browser cache: {again[:3]}"


# -- photo-first layout --------------------------------------------------------------------------


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_justified_grid_keeps_aspect_ratios_details_behind_a_toggle(open_page, server, dark):
    page = open_page(dark=dark)
    search_for(page, server, "a person", top_k=30)
    shot(page, f"desktop_{'dark' if dark else 'light'}")
    assert page.locator("#grid .card").count() == 30
    texts = page.locator("#grid .card").evaluate_all(
        "cards => cards.map(card => { const copy = card.cloneNode(true);"
        " copy.querySelectorAll('.dupes, time').forEach(badge => badge.remove());"
        " return copy.textContent.trim(); })"
    )
    assert texts == [""] * 30  # no file names, scores or ranks: only the date taken and "+N duplicates"
    ids = card_ids(page)
    found = requests.post(
        f"{server.url}/search", json={"query": "a person", "top_k": 30, "include_images": "none"}, timeout=30
    ).json()["results"]
    ratios = {hit["id"]: hit["metadata"]["width"] / hit["metadata"]["height"] for hit in found}
    cards = boxes(page, "#grid .card-button")
    grid = page.locator("#grid").bounding_box()
    rows: dict[int, list[dict]] = {}
    for card_id, box in zip(ids, cards, strict=True):
        assert box["width"] / box["height"] == pytest.approx(ratios[card_id], rel=0.03)
        rows.setdefault(round(box["top"]), []).append(box)
    assert len(set(ratios.values())) >= 3 and len(rows) >= 3
    for row in list(rows.values())[:-1]:  # every full row: one height, flush with both edges
        assert max(box["height"] for box in row) - min(box["height"] for box in row) <= 1.5
        assert row[0]["left"] == pytest.approx(grid["x"], abs=1)
        assert row[-1]["right"] == pytest.approx(grid["x"] + grid["width"], abs=1.5)

    page.locator("#grid .card-button").first.click()
    assert page.locator("#preview-details").is_hidden()
    assert page.locator("#details-toggle").get_attribute("aria-expanded") == "false"
    page.click("#details-toggle")
    details = page.locator("#preview-details").inner_text()
    assert found[0]["path"] in details and f"{found[0]['score']:.3f}" in details
    shot(page, f"preview_details_{'dark' if dark else 'light'}")


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_phone_shows_photos_first_with_options_behind_a_filter_button(open_page, server, dark):
    page = open_page(viewport=PHONE, dark=dark)
    search_for(page, server, "a street", top_k=40)
    shot(page, f"phone_{'dark' if dark else 'light'}")
    assert page.locator("#controls").is_hidden()
    visible = [box for box in boxes(page, "#grid .card-button") if box["top"] < PHONE["height"]]
    assert len(visible) >= 8, f"only {len(visible)} photos in the first screen"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    page.click("#filters-button")
    assert page.locator("#controls").is_visible()
    assert page.locator("#filters-button").get_attribute("aria-expanded") == "true"
    shot(page, f"phone_filters_{'dark' if dark else 'light'}")
    page.fill("#folder-filter", "")
    page.click("#filters-button")
    assert page.locator("#controls").is_hidden()


def test_next_page_starts_below_the_sticky_header(open_page, server):
    page = open_page(viewport=PHONE)
    search_for(page, server, "food on a table", top_k=20)
    page.locator("#next-page").scroll_into_view_if_needed()
    page.wait_for_timeout(1000)  # the page asks for the next page's answer while this one is read
    asked: list[dict] = []
    page.on(
        "request", lambda sent: asked.append(sent.post_data_json) if sent.url.endswith("/search") else None
    )
    turn_page(page, "#next-page")
    assert 20 not in [body["offset"] for body in asked], "Next waited for a search: it was not prefetched"
    page.wait_for_function("() => document.activeElement === document.querySelector('#results')")
    shot(page, "after_next")
    top = header_bottom(page)
    status = page.locator("#status").bounding_box()
    first = page.locator("#grid .card-button").first.bounding_box()
    assert page.locator("#status").inner_text().startswith("Results 21–40")
    assert status["y"] >= top and first["y"] >= top
    assert status["y"] < PHONE["height"] / 2


# -- point 5: what ranked, the similar-to picture, errors keep results, duplicates ---------------


def test_mode_switch_similar_chip_error_and_duplicates(open_page, server):
    page = open_page()
    search_for(page, server, "a dog", mode="hybrid", top_k=12)
    assert page.locator("#mode-hybrid").is_checked()
    page.locator("#grid .card-button").nth(1).click()
    wait_for_search(page, lambda: page.click("#more-like-this"))
    assert page.locator("#mode-vector").is_checked() and page.locator("#mode-hybrid").is_disabled()
    assert "Vector search" in page.locator("#status").inner_text()
    chip = page.locator("#query-chips .chip-image img")
    chip.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=chip.element_handle())
    shot(page, "similar_chip")

    before = card_ids(page)
    page.click("#advanced summary")
    page.fill("#raw-filter", "width >>> 3")
    wait_for_search(page, lambda: page.press("#raw-filter", "Enter"))
    error = requests.post(
        f"{server.url}/search", json={"query": "a dog", "filters": "width >>> 3"}, timeout=30
    ).json()["error"]
    assert error in page.locator('#status[data-kind="error"]').inner_text()
    assert card_ids(page) == before
    shot(page, "error_keeps_results")

    everything = requests.post(
        f"{server.url}/search", json={"query": "a dog", "top_k": 62, "include_images": "none"}, timeout=30
    ).json()["results"]
    folded = next(hit for hit in everything if hit["duplicates"])
    assert len(folded["duplicates"]) == DUPLICATES
    search_for(page, server, "a dog", top_k=62)
    card = page.locator(f'#grid .card[data-id="{folded["id"]}"]')
    assert card.locator(".dupes").inner_text() == f"+{DUPLICATES}"
    card.locator(".card-button").click()
    strip = page.locator("#duplicates-strip img")
    assert strip.count() == DUPLICATES
    for image in strip.all():
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    page.locator("#duplicates-strip button").nth(1).click()
    shown = folded["duplicates"][1]
    page.wait_for_function(
        "src => document.querySelector('#preview-image').src.endsWith(src)", arg=f"/images/{shown}"
    )
    shot(page, "duplicates_strip")


# -- point 7: keyboard, focus ring, heading ------------------------------------------------------


def contrast(page, selector: str) -> float:
    """Contrast of the focused element's outline colour against the page background."""
    return page.evaluate(
        """selector => {
            const channel = (value) => {
                value /= 255;
                return value <= 0.03928 ? value / 12.92 : ((value + 0.055) / 1.055) ** 2.4;
            };
            const luminance = (colour) => {
                const [r, g, b] = colour.match(/[\\d.]+/g).map(Number);
                return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
            };
            const style = getComputedStyle(document.querySelector(selector));
            if (style.outlineStyle === "none" || parseFloat(style.outlineWidth) < 2) return 0;
            const ring = luminance(style.outlineColor);
            const page = luminance(getComputedStyle(document.body).backgroundColor);
            return (Math.max(ring, page) + 0.05) / (Math.min(ring, page) + 0.05);
        }""",
        selector,
    )


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_keyboard_reaches_the_picker_moves_by_arrows_focus_ring_and_heading(open_page, server, dark):
    page = open_page(dark=dark)
    search_for(page, server, "a kitchen", top_k=24)
    assert page.locator("h1").count() == 1 and page.locator("h1").inner_text() == "Results for “a kitchen”"

    # A listener makes Playwright intercept file choosers from now on, so the one opened by the key press
    # below cannot come before the interception is set up (seen once on a loaded machine).
    page.on("filechooser", lambda chooser: None)
    page.focus("#query")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "image-button"
    assert contrast(page, "#image-button") >= 3
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    assert chooser.value.element.get_attribute("id") == "file-input"

    ids = card_ids(page)
    assert page.locator("#grid .card-button[tabindex='0']").count() == 1
    page.locator("#grid .card-button").first.focus()
    assert contrast(page, "#grid .card-button:focus") >= 3
    shot(page, f"focus_ring_{'dark' if dark else 'light'}")
    focused = "document.activeElement.closest('.card')?.dataset.id"
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == ids[1]
    page.keyboard.press("ArrowLeft")
    assert page.evaluate(focused) == ids[0]
    page_top = "document.activeElement.getBoundingClientRect().top + window.scrollY"  # in the document
    first_row_top = page.evaluate(page_top)
    page.keyboard.press("ArrowDown")
    assert page.evaluate(page_top) > first_row_top + 10
    page.keyboard.press("ArrowUp")
    assert page.evaluate(page_top) == pytest.approx(first_row_top, abs=1)
    page.keyboard.press("End")
    assert page.evaluate(focused) == ids[-1]
    page.keyboard.press("Home")
    assert page.evaluate(focused) == ids[0]
    page.keyboard.press("Tab")  # one Tab leaves the grid
    assert page.evaluate("document.activeElement.closest('#grid')") is None
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(focused) == ids[0]


# -- where it matched ----------------------------------------------------------------------------


def test_where_it_matched_overlay_shows_the_explain_heat(open_page, server):
    page = open_page()
    search_for(page, server, "a red bus", top_k=8)
    ids = card_ids(page)
    page.locator("#grid .card-button").nth(2).click()
    page.wait_for_function(
        "src => document.querySelector('#preview-image').src.endsWith(src)", arg=f"/images/{ids[2]}"
    )
    assert page.locator("#heat-overlay").is_hidden()
    with page.expect_response(lambda response: response.url.endswith("/explain")):
        page.click("#heat-toggle")
    overlay = page.locator("#heat-overlay")
    overlay.wait_for()
    expected = requests.post(
        f"{server.url}/explain", json={"id": ids[2], "query": "a red bus", "grid": 6}, timeout=60
    ).json()
    assert json.loads(overlay.get_attribute("data-heat")) == expected["heat"]
    assert overlay.locator(".heat-cell").count() == 36
    drawn = overlay.bounding_box()
    image = page.locator("#preview-image").bounding_box()
    natural = page.locator("#preview-image").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert drawn["width"] / drawn["height"] == pytest.approx(natural[0] / natural[1], rel=0.02)
    assert image["x"] - 1 <= drawn["x"] and drawn["x"] + drawn["width"] <= image["x"] + image["width"] + 1
    assert page.locator("#heat-toggle").get_attribute("aria-pressed") == "true"
    shot(page, "where_it_matched")
    page.click("#heat-toggle")
    assert overlay.is_hidden()
