"""Issue 13 (and issue 19 item 6) in a real chromium: other pages read nothing, our pages still work.

An attacking page is served from another local port; it tries the API directly, from a sandboxed
iframe (Origin null) and through <img>. DNS rebinding is played by mapping a foreign host name to
127.0.0.1 in the browser. The API's own /ui and index.html opened from disk (after following the link
the server prints) must keep working, and the page must never send its token to an ?api= address the
user did not confirm.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from api_server import ApiServer
from conftest import make_settings
from test_ui_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    card_ids,
    open_search,
    require_chromium,
    wait_for_search,
)

from image_retrieval import ImageRetrieval

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 8
REBOUND_HOST = "photos-rebound.test"

ATTEMPTS_JS = """
async function attempt(api, id) {
  const out = {};
  async function tryFetch(name, url, options) {
    try {
      const response = await fetch(url, options);
      out[name] = {status: response.status, body: await response.text()};
    } catch (error) {
      out[name] = {error: String(error)};
    }
  }
  const search = JSON.stringify({query: "a photo", top_k: 3});
  await tryFetch("search", api + "/search",
    {method: "POST", headers: {"Content-Type": "application/json"}, body: search});
  await tryFetch("search_with_cookies", api + "/search",
    {method: "POST", credentials: "include", headers: {"Content-Type": "application/json"}, body: search});
  await tryFetch("search_as_text", api + "/search",
    {method: "POST", headers: {"Content-Type": "text/plain"}, body: search});
  await tryFetch("health", api + "/");
  await tryFetch("thumbnail", api + "/thumbnails/" + id);
  await tryFetch("original", api + "/images/" + id);
  for (const kind of ["thumbnails", "images"]) {
    out["img_" + kind] = await new Promise((resolve) => {
      const image = new Image();
      image.onload = () => resolve({loaded: image.naturalWidth});
      image.onerror = () => resolve({error: "not loaded"});
      image.src = api + "/" + kind + "/" + id;
    });
  }
  return out;
}
"""


def attacker_page(api: str, image_id: str) -> str:
    frame = (
        f"<script>{ATTEMPTS_JS}"
        f"attempt({json.dumps(api)}, {json.dumps(image_id)}).then(out => parent.postMessage(out, '*'));"
        "</script>"
    )
    return f"""<!doctype html><title>another site</title>
<script>{ATTEMPTS_JS}
window.addEventListener("message", (event) => {{ window.__frame = event.data; }});
attempt({json.dumps(api)}, {json.dumps(image_id)}).then(out => {{ window.__direct = out; }});
</script>
<iframe sandbox="allow-scripts" srcdoc="{frame.replace("&", "&amp;").replace('"', "&quot;")}"></iframe>
"""


class LocalSite:
    """A web server on another local port: serves one page and records every request's headers."""

    def __init__(self, page: str = "", answer: bytes = b"{}") -> None:
        site = self
        self.page, self.answer, self.requests = page, answer, []

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bytes, content_type: str) -> None:
                site.requests.append((self.command, self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Headers", "authorization, content-type")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/page"):
                    self._reply(site.page.encode(), "text/html")
                else:
                    self._reply(site.answer, "application/json")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(site.answer, "application/json")

            def do_OPTIONS(self) -> None:
                self._reply(b"", "text/plain")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalSite:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, coco_source) -> Iterator[ApiServer]:
    """`python api.py` with the defaults that matter here: no API_TOKEN, no CORS_ORIGINS."""
    source, annotations = coco_source
    base = tmp_path_factory.mktemp("ui-access")
    dataset = base / "dataset"
    dataset.mkdir()
    for annotation in annotations[:PHOTOS]:
        shutil.copy(source / annotation["image"], dataset / annotation["image"])
    settings = make_settings(base, dataset, tiny_checkpoint)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
    with ApiServer(settings) as api:
        yield api


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    args = [
        *CHROMIUM_ARGS,
        f"--host-resolver-rules=MAP {REBOUND_HOST} 127.0.0.1",
        "--disable-features=HttpsUpgrades",
    ]
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def an_image_id(server: ApiServer) -> str:
    found = requests.post(f"{server.url}/search", json={"query": "a photo", "top_k": 1}, timeout=60)
    return found.json()["results"][0]["id"]


def connect_link(server: ApiServer) -> str:
    """The link the server printed for a page opened from disk."""
    match = re.search(r"page opened from disk: (\S+)", server.log())
    assert match, server.log()
    return match.group(1)


def with_query(link: str, query: str) -> str:
    address, _, fragment = link.partition("#")
    return f"{address}&{query}#{fragment}"


def assert_read_nothing(attempts: dict, where: str) -> None:
    expected = {"search", "search_as_text", "thumbnail", "original", "img_thumbnails", "img_images"}
    assert set(attempts) >= expected
    for name, outcome in attempts.items():
        assert outcome.get("status") != 200 and "loaded" not in outcome, (where, name, outcome)
        assert '"results"' not in outcome.get("body", ""), (where, name, outcome)


# -- tests ---------------------------------------------------------------------------------------


def test_a_page_of_another_local_port_reads_nothing(page, server):
    image_id = an_image_id(server)
    with LocalSite(attacker_page(server.url, image_id)) as site:
        page.goto(f"http://127.0.0.1:{site.port}/page")
        page.wait_for_function("() => window.__direct && window.__frame")
        direct, framed = page.evaluate("[window.__direct, window.__frame]")
    assert_read_nothing(direct, "page on another port")
    assert_read_nothing(framed, "sandboxed iframe (Origin null)")
    # The refusals that a page can read say why, and nothing else.
    assert direct["search"]["status"] == 401
    assert "access token" in json.loads(direct["search"]["body"])["error"]
    assert framed["search"]["status"] == 401
    assert requests.get(f"{server.url}/index", timeout=10).json()["state"] == "idle"


def test_a_rebound_host_name_reads_nothing(page, server):
    image_id = an_image_id(server)
    rebound = f"http://{REBOUND_HOST}:{server.port}"
    refused = page.goto(f"{rebound}/ui")
    assert refused.status == 403 and "ALLOWED_HOSTS" in page.inner_text("body")
    script = f"async ([api, id]) => {{ {ATTEMPTS_JS}; return await attempt(api, id); }}"
    same_origin = page.evaluate(script, [rebound, image_id])
    assert_read_nothing(same_origin, "rebound host name")
    assert same_origin["search"]["status"] == 403 and same_origin["thumbnail"]["status"] == 403


def test_ui_served_by_the_api_works_with_no_step(page, server):
    page.goto(f"{server.url}/ui")
    page.fill("#query", "a photo")
    wait_for_search(page, lambda: page.press("#query", "Enter"))
    assert len(card_ids(page)) == PHOTOS
    page.wait_for_function(  # thumbnails load by URL after the cards appear: wait, then they must all show
        "() => [...document.querySelectorAll('#grid .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.locator("#grid .card-button").first.click()
    page.wait_for_function("() => document.querySelector('#preview-image').src.includes('/images/')")
    page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")


def test_a_page_from_disk_works_after_the_printed_link_and_keeps_its_token(page, server):
    link = connect_link(server)
    assert link.startswith((ROOT / "index.html").as_uri()) and f"#token={server.token}" in link
    open_search(page, with_query(link, "q=a%20photo&top_k=5"))
    assert len(card_ids(page)) == 5
    assert "token" not in page.url  # the token left the address bar
    assert page.locator("#api-status").get_attribute("data-state") == "up"
    page.locator("#grid .card-button").first.click()
    page.wait_for_function("() => document.querySelector('#preview-image').src.startsWith('blob:')")
    # Later visits need no link: the token is kept for this address.
    open_search(page, f"{(ROOT / 'index.html').as_uri()}?api={server.url}&q=a%20dog&top_k=3")
    assert len(card_ids(page)) == 3


def test_a_page_from_disk_without_the_token_is_told_how_to_connect(page, server):
    open_search(page, f"{(ROOT / 'index.html').as_uri()}?api={server.url}&q=a%20photo")
    message = page.locator('#status[data-kind="error"]').inner_text()
    assert "needs its access token" in message and "Settings" in message
    assert page.locator("#grid .card").count() == 0


def test_the_token_is_never_sent_to_an_unconfirmed_api_address(page, server):
    open_search(page, with_query(connect_link(server), "q=a%20photo&top_k=2"))
    assert len(card_ids(page)) == 2
    answer = json.dumps({"status": "ok", "images": 0, "results": [], "has_more": False}).encode()
    with LocalSite(answer=answer) as other:
        other_api = f"http://127.0.0.1:{other.port}"
        page.goto(f"{(ROOT / 'index.html').as_uri()}?api={other_api}&q=a%20dog")
        page.wait_for_function("() => document.querySelector('#status').dataset.kind !== 'loading'")
        page.wait_for_timeout(500)
        seen = list(other.requests)
    assert any(method == "POST" for method, _, _ in seen), seen
    for _, _, headers in seen:
        assert server.token not in json.dumps(headers) and "authorization" not in {h.lower() for h in headers}
    # Confirming the address in Settings (with that API's own token) is what sends a token there.
    page.click("#settings-button")
    assert page.locator("#api-token").input_value() == ""
