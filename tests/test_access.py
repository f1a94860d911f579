"""Issue 13: who may use the API (Host check, origins, the access token) and two clearer errors."""

from __future__ import annotations

import io
import os
import shutil
import stat
import urllib.error
from pathlib import Path

import pytest
from conftest import make_settings
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 4


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoint, coco_source, encoder):
    """An engine over a few indexed photos."""
    from image_retrieval import ImageRetrieval

    source, annotations = coco_source
    base = tmp_path_factory.mktemp("access")
    dataset = base / "dataset"
    dataset.mkdir()
    for annotation in annotations[:PHOTOS]:
        shutil.copy(source / annotation["image"], dataset / annotation["image"])
    settings = make_settings(base, dataset, tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    with ImageRetrieval(settings, encoder=encoder, role="api") as engine:
        engine.index_folder()
        yield engine


def client_for(engine, **overrides):
    from api import create_app

    settings = engine.settings.with_overrides(**overrides)
    app = create_app(settings, engine)
    return app.test_client(), app.extensions["image_search_api"].access.token


def first_id(client, headers=None) -> str:
    response = client.post("/search", json={"query": "a photo", "top_k": 1}, headers=headers or {})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"][0]["id"]


# -- Host ----------------------------------------------------------------------------------------


def test_a_foreign_host_is_refused_before_anything_else(indexed):
    engine = indexed
    client, token = client_for(engine, MAX_UPLOAD_MB=0.01)
    image_id = first_id(client)
    foreign = {"Host": "attacker.example:8000"}
    for method, path, body in (
        ("get", "/", None),
        ("get", "/ui", None),
        ("get", "/static/app.js", None),
        ("get", f"/thumbnails/{image_id}", None),
        ("get", f"/images/{image_id}", None),
        ("post", "/search", b"{not json"),
        ("post", "/search", b"x" * 20000),
        ("post", "/index", None),
    ):
        headers = {**foreign, "Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        response = getattr(client, method)(path, data=body, headers=headers)
        assert response.status_code == 403, (path, response.status_code)
        error = response.get_json()["error"]
        assert "attacker.example" in error and "ALLOWED_HOSTS" in error
    assert client.get("/index").get_json()["state"] == "idle"
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("localhost.attacker.example", "127.0.0.1.nip.io", "photos.lan", "10.0.0.5", ""):
        assert client.get("/", headers={"Host": host}).status_code == 403, host


def test_allowed_hosts_and_the_bound_address_are_answered(indexed):
    engine = indexed
    listed, _ = client_for(engine, ALLOWED_HOSTS="photos.lan, Search.Example")
    assert listed.get("/", headers={"Host": "photos.lan:8000"}).status_code == 200
    assert listed.get("/", headers={"Host": "search.example"}).status_code == 200
    assert listed.get("/", headers={"Host": "other.lan"}).status_code == 403
    bound, _ = client_for(engine, API_HOST="192.168.7.2")
    assert bound.get("/", headers={"Host": "192.168.7.2:8000"}).status_code == 200
    assert bound.get("/", headers={"Host": "192.168.7.3:8000"}).status_code == 403
    everywhere, _ = client_for(engine, API_HOST="0.0.0.0")
    assert everywhere.get("/", headers={"Host": "192.168.7.3:8000"}).status_code == 200
    assert everywhere.get("/", headers={"Host": "photos.lan:8000"}).status_code == 403
    anything, _ = client_for(engine, ALLOWED_HOSTS="*")
    assert anything.get("/", headers={"Host": "photos.lan:8000"}).status_code == 200


# -- origins and the token -----------------------------------------------------------------------


def test_pages_of_other_origins_read_nothing_without_the_token(indexed):
    engine = indexed
    client, token = client_for(engine)
    image_id = first_id(client)
    for origin in ("null", "http://localhost:5173", "http://127.0.0.1:8080", "http://evil.example"):
        for method, path in (
            ("post", "/search"),
            ("get", "/"),
            ("get", f"/thumbnails/{image_id}"),
            ("get", f"/images/{image_id}"),
            ("get", "/index"),
            ("post", "/index"),
            ("get", "/openapi.json"),
        ):
            body = {"query": "a photo"} if path == "/search" else None
            response = getattr(client, method)(path, json=body, headers={"Origin": origin})
            assert response.status_code == 401, (origin, path)
            assert set(response.get_json()) == {"error"} and "token" in response.get_json()["error"]
            assert response.headers["Access-Control-Allow-Origin"] == origin  # the refusal is readable
        with_token = {"Origin": origin, "Authorization": f"Bearer {token}"}
        answered = client.post("/search", json={"query": "a photo"}, headers=with_token)
        assert answered.status_code == 200 and answered.get_json()["results"]
        assert answered.headers["Access-Control-Allow-Origin"] == origin
        thumbnail = client.get(
            f"/thumbnails/{image_id}", headers={"Origin": origin, "Authorization": f"Bearer {token}"}
        )
        assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.data)).width > 0
    wrong_token = {"Origin": "null", "Authorization": "Bearer nope"}
    wrong = client.post("/search", json={"query": "a"}, headers=wrong_token)
    assert wrong.status_code == 401 and "wrong token" in wrong.get_json()["error"]
    # A text/plain form post from any page is refused before it runs (it carries Origin).
    posted = client.post("/index", data="{}", headers={"Origin": "null", "Content-Type": "text/plain"})
    assert posted.status_code == 401 and client.get("/index").get_json()["state"] == "idle"
    # An <img> of another site sends no Origin, but the browser says it is cross-site.
    for site in ("cross-site", "same-site"):
        embedded = client.get(f"/thumbnails/{image_id}", headers={"Sec-Fetch-Site": site})
        assert embedded.status_code == 401 and embedded.mimetype == "application/json", site


def test_the_api_own_page_and_programs_need_no_token(indexed):
    engine = indexed
    client, _ = client_for(engine)
    image_id = first_id(client)  # a program: no Origin, no Sec-Fetch-Site
    own = {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/search", json={"query": "a photo"}, headers=own).status_code == 200
    same_page = {"Host": "127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert client.get(f"/thumbnails/{image_id}", headers=same_page).status_code == 200
    typed = {"Host": "localhost:8000", "Sec-Fetch-Site": "none"}  # the address typed in the address bar
    assert client.get(f"/images/{image_id}", headers=typed).status_code == 200
    assert client.get("/ui", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert client.get("/static/app.js", headers={"Origin": "http://evil.example"}).status_code == 200


def test_cors_origins_opt_in_trusts_pages_without_the_token(indexed):
    engine = indexed
    client, _ = client_for(engine, CORS_ORIGINS="null,http://localhost")
    for origin in ("null", "http://localhost:5173", "http://localhost"):
        response = client.post("/search", json={"query": "a photo"}, headers={"Origin": origin})
        assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == origin
    for origin in ("http://127.0.0.1:5173", "http://localhost.evil.example"):
        response = client.post("/search", json={"query": "a photo"}, headers={"Origin": origin})
        assert response.status_code == 401 and "results" not in response.get_json()


def test_a_set_api_token_is_required_from_everyone(indexed):
    engine = indexed
    client, token = client_for(engine, API_TOKEN="s3cret-value")
    assert token == "s3cret-value"
    own = {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}
    for headers in ({}, own):
        assert client.post("/search", json={"query": "a"}, headers=headers).status_code == 401
    assert (
        client.post(
            "/search", json={"query": "a"}, headers={"Authorization": "Bearer s3cret-value"}
        ).status_code
        == 200
    )
    assert client.get("/").status_code == 200
    assert client.get("/", headers={"Origin": "null"}).status_code == 401


def test_the_token_is_made_once_and_kept_private_with_the_database(indexed, tmp_path):
    from api import connect_instructions
    from api_access import load_or_create_token

    engine = indexed
    _, token = client_for(engine)
    token_file = Path(engine.settings.CHROMA_DB_PATH) / "api_token"
    assert token_file.read_text().strip() == token and len(token) >= 40
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert client_for(engine)[1] == token
    folder = tmp_path / "db"
    made = load_or_create_token(folder)
    assert made != token and load_or_create_token(folder) == made
    os.chmod(folder / "api_token", 0o644)
    assert load_or_create_token(folder) == made
    assert stat.S_IMODE((folder / "api_token").stat().st_mode) == 0o600
    lines = "\n".join(connect_instructions(engine.settings, "http://127.0.0.1:8000", token))
    assert "http://127.0.0.1:8000/ui" in lines
    assert f"{(ROOT / 'index.html').as_uri()}?api=http://127.0.0.1:8000#token={token}" in lines
    assert str(token_file) in lines
    explicit = engine.settings.with_overrides(API_TOKEN="mine", CHROMA_DB_PATH=str(tmp_path / "unused"))
    assert "mine" not in "\n".join(connect_instructions(explicit, "http://127.0.0.1:8000", "mine"))
    client_for(engine, API_TOKEN="mine", CHROMA_DB_PATH=str(tmp_path / "unused"))
    assert not (tmp_path / "unused" / "api_token").exists()


# -- smaller errors ------------------------------------------------------------------------------


def test_a_form_of_too_many_parts_says_so(indexed):
    engine = indexed
    client, _ = client_for(engine)
    fields = {f"f{number}": "x" for number in range(2000)}
    response = client.post("/search", data=fields, content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.get_json()["error"] == "the form has too many parts: at most 1000 fields and files"


def test_a_failed_weight_download_says_what_to_do(monkeypatch, tmp_path):
    import clip.clip

    import clip_encoder
    from clip_encoder import ClipEncoder
    from errors import ModelLoadError

    real_url = clip.clip._MODELS["ViT-B/32"]
    unreachable = real_url.replace("openaipublic.azureedge.net", "weights.invalid")
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", unreachable)
    monkeypatch.setattr(clip_encoder, "CLIP_CACHE_FOLDER", tmp_path / "clip-cache")
    with pytest.raises(ModelLoadError) as failure:
        ClipEncoder("ViT-B/32", "cpu")
    message = str(failure.value)
    assert isinstance(failure.value.__cause__, urllib.error.URLError)
    assert "could not be downloaded from the internet" in message
    assert str(tmp_path / "clip-cache") in message
    assert "MODEL_NAME (or --model)" in message and "local checkpoint file" in message
    assert not list((tmp_path / "clip-cache").glob("*.pt"))
