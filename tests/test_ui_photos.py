"""Issue 14 in the web page: date taken on the cards, the preview's camera, place and map link, the
date-range filter and the order by date taken, in a real chromium against a real `python api.py`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_server import ApiServer
from conftest import make_settings
from test_photo_metadata import LISBON, SYDNEY, TOKYO, write_photo
from test_ui_browser import (
    api_search,
    browser,
    card_ids,
    open_search,
    page,
    ui_url,
    url_state,
    wait_for_search,
)

from image_retrieval import ImageRetrieval

__all__ = ["browser", "page"]  # the browser fixtures, shared with test_ui_browser.py


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint) -> Iterator[ApiServer]:
    dataset = tmp_path_factory.mktemp("ui-photos") / "dataset"
    write_photo(dataset / "lisbon.jpg", 40, taken="2019:07:01 10:00:00", offset="+01:00", position=LISBON,
                make="Apple", model="iPhone 12", exposure=(1, 250), iso=125)  # fmt: skip
    write_photo(
        dataset / "tokyo.jpg", 41, taken="2018:03:10 09:00:00", position=TOKYO, make="SONY", model="ILCE-7M3"
    )
    write_photo(dataset / "sydney.avif", 42, "AVIF", taken="2021:08:08 08:08:08", position=SYDNEY)
    write_photo(dataset / "undated.jpg", 43)
    settings = make_settings(tmp_path_factory.mktemp("ui-photos-index"), dataset, tiny_checkpoint)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        assert engine.count() == 4
    with ApiServer(settings) as api:
        yield api


def names_on_page(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(card => card.dataset.name)")


def test_order_by_date_taken_and_date_range(page, server):
    open_search(page, ui_url(server, q="a photo"))
    wait_for_search(page, lambda: page.select_option("#sort", "-taken"))
    assert names_on_page(page) == ["sydney.avif", "lisbon.jpg", "tokyo.jpg", "undated.jpg"]
    expected = api_search(server, query="a photo", sort="-taken")
    assert card_ids(page) == [hit["id"] for hit in expected]
    assert url_state(page)["sort"] == "-taken"
    taken = page.locator("#grid .card time.card-taken")
    assert taken.evaluate_all("times => times.map(time => time.getAttribute('datetime'))") == [
        "2021-08-08T08:08:08",
        "2019-07-01T10:00:00+01:00",
        "2018-03-10T09:00:00",
    ]

    page.fill("#taken-from", "2019-01-01")
    wait_for_search(page, lambda: page.fill("#taken-to", "2021-08-08"))  # the whole last day counts
    assert names_on_page(page) == ["sydney.avif", "lisbon.jpg"]
    assert {"taken_from": "2019-01-01", "taken_to": "2021-08-08"}.items() <= url_state(page).items()
    assert "2019-01-01 – 2021-08-08" in page.locator("#query-chips").inner_text()

    page.reload()
    page.wait_for_selector("#grid .card")
    assert names_on_page(page) == ["sydney.avif", "lisbon.jpg"] and page.input_value("#sort") == "-taken"


def test_preview_shows_when_where_and_with_what(page, server):
    open_search(page, ui_url(server, q="a photo", sort="taken"))
    assert names_on_page(page)[0] == "tokyo.jpg"
    page.locator("#grid .card-button").nth(1).click()
    facts = page.locator("#preview-facts")
    text = facts.inner_text()
    assert page.locator("#preview-title").inner_text() == "lisbon.jpg"
    assert (
        "Apple iPhone 12" in text and "Lisbon, Portugal" in text and "1/250 s" in text and "ISO 125" in text
    )
    link = facts.locator("a.map-link")
    href = link.get_attribute("href")
    assert href.startswith("https://www.openstreetmap.org/?mlat=38.72") and "mlon=-9.13" in href
    assert "photo metadata" not in text and "latitude" not in text  # shown once, not as raw fields
