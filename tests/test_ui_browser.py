"""Issue 5: the web UI (index.html + static/) in a real chromium against a real `python api.py`."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from api_server import ApiServer, free_port, served_in_process
from conftest import make_settings

from image_retrieval import ImageRetrieval, no_words_note

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IMAGE_COUNT = 20
FOLDERS = ("albums/home", "albums/travel")
TIMEOUT_MS = 30000


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_dataset(tmp_path_factory, coco_source) -> tuple[Path, list[dict]]:
    """About twenty captioned photos in two folders; records carry caption and categories."""
    source, annotations = coco_source
    dataset = tmp_path_factory.mktemp("ui") / "dataset"
    records = []
    for index, annotation in enumerate(annotations[:IMAGE_COUNT]):
        relative = f"{FOLDERS[index % 2]}/{annotation['image']}"
        (dataset / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / annotation["image"], dataset / relative)
        records.append(
            {"path": relative, "description": annotation["captions"][0], "tags": annotation["categories"]}
        )
    return dataset, records


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, ui_dataset) -> Iterator[ApiServer]:
    """`python api.py` over an index built here (embedded Chroma, released before the server starts)."""
    dataset, records = ui_dataset
    settings = make_settings(tmp_path_factory.mktemp("ui-index"), dataset, tiny_checkpoint)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        engine.import_metadata(records)
        assert engine.count() == len(records)
    with ApiServer(settings) as api:
        yield api


def require_chromium() -> None:
    """Skip without Debian's chromium, except in CI, where the browser tests must run."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; browser tests must run in CI", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    """A fresh page (own storage); its screenshot is saved to tests/artifacts/ when the test ends."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# -- helpers -------------------------------------------------------------------------------------


def api_search(server: ApiServer, **body) -> list[dict]:
    response = requests.post(f"{server.url}/search", json={"include_images": "none", **body}, timeout=60)
    assert response.ok, response.text
    return response.json()["results"]


def card_ids(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(card => card.dataset.id)")


def card_scores(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(card => card.dataset.score)")


def wait_for_search(page, action) -> None:
    """Run `action`, wait for its POST /search answer and for the page to show the outcome."""
    with page.expect_response(lambda response: response.url.endswith("/search")):
        action()
    page.wait_for_function(
        "() => !document.body.classList.contains('is-loading')"
        " && document.querySelector('#status').dataset.kind !== 'loading'"
    )


def turn_page(page, button: str) -> None:
    """Click a pager button; the answer may already be there (the page prefetches the next page)."""
    before = card_ids(page)
    page.click(button)
    page.wait_for_function(
        "before => document.querySelector('#status').dataset.kind === 'results'"
        " && JSON.stringify([...document.querySelectorAll('#grid .card')].map(c => c.dataset.id))"
        " !== JSON.stringify(before)",
        arg=before,
    )


def ui_url(server: ApiServer, **params: str) -> str:
    query = "&".join(f"{key}={requests.utils.quote(str(value))}" for key, value in params.items())
    return f"{server.url}/ui" + (f"?{query}" if query else "")


def url_state(page) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlparse(page.url).query).items()}


def open_search(page, url: str) -> None:
    wait_for_search(page, lambda: page.goto(url))


# -- tests ---------------------------------------------------------------------------------------


def test_text_search_shows_top_k_cards_in_api_order(page, server):
    page.goto(ui_url(server))
    page.fill("#top-k", "7")
    page.fill("#query", "a living room with a couch")
    page.evaluate(
        """() => {
            window.__statusKinds = [];
            const status = document.querySelector("#status");
            new MutationObserver(() => window.__statusKinds.push(status.dataset.kind))
                .observe(status, {attributes: true, attributeFilter: ["data-kind"]});
        }"""
    )
    wait_for_search(page, lambda: page.press("#query", "Enter"))
    assert page.evaluate("window.__statusKinds") == ["loading", "results"]

    expected = api_search(server, query="a living room with a couch", top_k=7)
    assert card_ids(page) == [hit["id"] for hit in expected]
    assert card_scores(page) == [f"{hit['score']:.3f}" for hit in expected]
    names = page.locator("#grid .card").evaluate_all("cards => cards.map(card => card.dataset.name)")
    assert names == [hit["metadata"]["name"] for hit in expected]
    for image in page.locator("#grid .card img").all():
        assert image.get_attribute("alt")
    # Thumbnails load by URL after the answer, so their arrival is waited for (a broken one never loads).
    page.wait_for_function(
        "() => [...document.querySelectorAll('#grid .card img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    assert page.locator("#status").inner_text().startswith("Results 1–7")
    assert url_state(page) == {"q": "a living room with a couch", "top_k": "7"}

    page.set_viewport_size({"width": 390, "height": 844})
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "text_search_phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_preview_opens_closes_and_arrow_keys_move(page, server):
    open_search(page, ui_url(server, q="people", top_k=5))
    ids = card_ids(page)
    assert len(ids) == 5
    preview = page.locator("#preview")

    page.locator("#grid .card-button").first.click()
    assert preview.is_visible() and preview.get_attribute("data-id") == ids[0]
    hit = api_search(server, query="people", top_k=5)[0]
    assert page.locator("#preview-title").inner_text() == hit["metadata"]["name"]
    page.click("#details-toggle")
    assert hit["path"] in page.locator("#engine-facts").inner_text()
    page.wait_for_function(
        "src => document.querySelector('#preview-image').src.endsWith(src)", arg=f"/images/{ids[0]}"
    )
    assert page.locator("#open-original").get_attribute("href") == f"{server.url}/images/{ids[0]}"

    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert preview.get_attribute("data-id") == ids[2]
    page.keyboard.press("ArrowLeft")
    assert preview.get_attribute("data-id") == ids[1]
    page.screenshot(path=str(ARTIFACTS.joinpath("preview_open.png")))

    page.keyboard.press("Escape")
    assert not preview.is_visible()
    page.wait_for_function("id => document.activeElement.closest('.card')?.dataset.id === id", arg=ids[1])

    page.keyboard.press("Enter")
    assert preview.is_visible() and preview.get_attribute("data-id") == ids[1]
    page.click("#preview-close")
    assert not preview.is_visible()


def test_more_like_this_replaces_results_and_excludes_the_image(page, server):
    open_search(page, ui_url(server, q="a street", top_k=6))
    before = card_ids(page)
    chosen = before[2]
    page.locator("#grid .card-button").nth(2).click()
    wait_for_search(page, lambda: page.click("#more-like-this"))

    expected = [hit["id"] for hit in api_search(server, similar_to=chosen, top_k=6)]
    assert card_ids(page) == expected != before
    assert chosen not in card_ids(page)
    assert url_state(page)["similar_to"] == chosen
    assert page.locator("#query").input_value() == ""
    assert "Similar to" in page.locator("#query-chips").inner_text()


def test_more_like_this_in_hybrid_mode_ranks_by_vector_and_says_so(page, server):
    open_search(page, ui_url(server, q="a street", top_k=6, mode="hybrid"))
    assert "Hybrid search" in page.locator("#status").inner_text()
    chosen = card_ids(page)[1]
    page.locator("#grid .card-button").nth(1).click()
    wait_for_search(page, lambda: page.click("#more-like-this"))

    assert card_ids(page) == [hit["id"] for hit in api_search(server, similar_to=chosen, top_k=6)]
    status = page.locator("#status").inner_text()
    assert "Vector search" in status and no_words_note("hybrid") in status
    assert url_state(page)["mode"] == "hybrid"


def test_file_pick_runs_an_image_search(page, server, ui_dataset):
    dataset, records = ui_dataset
    picked = records[5]["path"]
    page.goto(ui_url(server))
    wait_for_search(page, lambda: page.set_input_files("#file-input", str(dataset / picked)))

    first = page.locator("#grid .card").first
    assert first.get_attribute("data-path") == picked
    assert float(first.get_attribute("data-score")) > 0.99
    data_uri = "data:image/jpeg;base64," + base64.b64encode((dataset / picked).read_bytes()).decode()
    assert card_ids(page) == [hit["id"] for hit in api_search(server, image=data_uri, top_k=20)]
    assert Path(picked).name in page.locator("#query-chips").inner_text()
    assert url_state(page).get("image") == "1"


def test_dropping_an_image_runs_an_image_search(page, server, ui_dataset):
    dataset, records = ui_dataset
    dropped = records[8]["path"]
    page.goto(ui_url(server, top_k=4))
    page.evaluate(
        """({data, name}) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            window.__drop = new DataTransfer();
            window.__drop.items.add(new File([bytes], name, {type: "image/jpeg"}));
            for (const type of ["dragenter", "dragover"]) {
                document.querySelector("main").dispatchEvent(
                    new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: window.__drop}));
            }
        }""",
        {"data": base64.b64encode((dataset / dropped).read_bytes()).decode(), "name": Path(dropped).name},
    )
    assert page.locator("#drop-overlay").is_visible()
    page.screenshot(path=str(ARTIFACTS / "drop_overlay.png"))
    wait_for_search(
        page,
        lambda: page.evaluate(
            """() => document.querySelector("#grid").dispatchEvent(
                new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: window.__drop}))"""
        ),
    )

    assert not page.locator("#drop-overlay").is_visible()
    assert page.locator("#grid .card").count() == 4
    assert page.locator("#grid .card").first.get_attribute("data-path") == dropped


def test_page_opened_from_disk_talks_to_the_api(page, server):
    # The documented step: the link the server prints, which carries its access token.
    link = re.search(r"page opened from disk: (\S+)", server.log()).group(1)
    address, _, fragment = link.partition("#")
    url = f"{address}&q=food%20on%20a%20plate&top_k=5&mode=hybrid#{fragment}"
    open_search(page, url)

    expected = api_search(server, query="food on a plate", top_k=5, mode="hybrid")
    assert card_ids(page) == [hit["id"] for hit in expected]
    page.locator("#grid .card-button").first.click()
    page.click("#details-toggle")
    why = page.locator("#preview-why").inner_text().lower()
    assert "vector" in why and "keyword" in why
    assert page.locator("#api-status").get_attribute("data-state") == "up"
    assert f"{IMAGE_COUNT} images" in page.locator("#api-status").inner_text()


def test_api_down_shows_the_address_it_tried(page):
    closed = f"http://127.0.0.1:{free_port()}"
    page.goto(f"{(ROOT / 'index.html').as_uri()}?api={closed}&q=a%20dog")
    status = page.locator('#status[data-kind="unreachable"]')
    status.wait_for()
    assert f"Cannot reach the image search API at {closed}" in status.inner_text()
    assert page.locator("#grid .card").count() == 0
    expect_text = re.compile(re.escape(f"unreachable at {closed}"))
    assert expect_text.search(page.locator("#api-status").inner_text())


def test_url_state_paging_and_reload_restore_the_search(page, server):
    page.goto(ui_url(server))
    page.click("label[for=mode-hybrid]")
    page.fill("#top-k", "3")
    page.fill("#folder-filter", FOLDERS[1])
    page.fill("#query", "a person")
    wait_for_search(page, lambda: page.click("#search-button"))
    first_page = card_ids(page)
    turn_page(page, "#next-page")
    second_page = card_ids(page)

    body = {"query": "a person", "top_k": 3, "mode": "hybrid", "filters": f"folder prefix {FOLDERS[1]}"}
    assert first_page == [hit["id"] for hit in api_search(server, **body)]
    assert second_page == [hit["id"] for hit in api_search(server, **body, offset=3)]
    assert all(hit["path"].startswith(FOLDERS[1]) for hit in api_search(server, **body, offset=3))
    state = url_state(page)
    assert state == {"q": "a person", "mode": "hybrid", "top_k": "3", "folder": FOLDERS[1], "page": "2"}

    wait_for_search(page, lambda: page.reload())
    assert card_ids(page) == second_page
    assert page.locator("#query").input_value() == "a person"
    assert page.locator("#mode-hybrid").is_checked()
    assert page.locator("#folder-filter").input_value() == FOLDERS[1]
    assert page.locator("#top-k").input_value() == "3"

    wait_for_search(page, lambda: page.go_back())
    assert card_ids(page) == first_page


def test_no_results_and_api_errors_are_explained(page, server):
    open_search(page, ui_url(server, q="a cat", tag="no-such-tag"))
    assert page.locator('#status[data-kind="empty"]').inner_text().startswith("No images match “a cat”.")
    assert "remove a filter" in page.locator("#status").inner_text()

    open_search(page, ui_url(server, q="a cat", filters="width >>> 3"))
    body = {"query": "a cat", "filters": "width >>> 3"}
    error = requests.post(f"{server.url}/search", json=body, timeout=30)
    assert error.status_code == 400
    message = page.locator('#status[data-kind="error"]').inner_text()
    assert message.startswith("The search failed: ") and error.json()["error"] in message


def test_top_k_control_honours_a_smaller_max_top_k(page, tmp_path, tiny_checkpoint, encoder, ui_dataset):
    from api import create_app

    limited = make_settings(tmp_path, ui_dataset[0], tiny_checkpoint, MAX_TOP_K=7, MAX_QUERY_CHARS=40)
    with ImageRetrieval(limited, encoder=encoder, role="api") as engine:
        engine.index_folder()
        with served_in_process(create_app(limited, engine)) as url:
            page.goto(f"{url}/ui")
            page.wait_for_selector("#api-status[data-state='up']")
            assert page.get_attribute("#top-k", "max") == "7"
            assert page.eval_on_selector("#query", "input => input.maxLength") == 40
            page.fill("#query", "a photo")
            page.fill("#top-k", "50")
            with page.expect_request(lambda request: request.url.endswith("/search")) as sent:
                wait_for_search(page, lambda: page.press("#query", "Enter"))
            assert sent.value.post_data_json["top_k"] == 7
            assert page.input_value("#top-k") == "7" and len(card_ids(page)) == 7
            assert page.locator("#status").get_attribute("data-kind") == "results"
