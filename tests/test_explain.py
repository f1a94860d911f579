"""Issue 15: "where it matched", a heat map of a query over an indexed image (engine and POST /explain)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from api_server import ApiServer
from conftest import make_settings
from openapi_schema_validator import OAS30Validator
from PIL import Image
from torchvision import transforms

from errors import QueryError
from explain import DEFAULT_GRID, windows
from image_retrieval import ImageRetrieval, QueryPart
from indexer import image_id

SIDE = 224
COMPOSITE = "composite.png"


def model_view(path: Path) -> Image.Image:
    """The square the model sees of a photo: the short side scaled to 224 px, the centre kept."""
    view = transforms.Compose(
        [
            transforms.Resize(SIDE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(SIDE),
        ]
    )
    return view(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def composite_index(tmp_path_factory, tiny_checkpoint, coco_source):
    """Two photos and a composite of them (the first on the left half, the second on the right)."""
    folder, annotations = coco_source
    base = tmp_path_factory.mktemp("explain")
    dataset = base / "dataset"
    dataset.mkdir()
    left, right = (annotations[index]["image"] for index in (0, 1))
    for name in (left, right):
        shutil.copy(folder / name, dataset / name)
    composite = Image.new("RGB", (2 * SIDE, SIDE))
    composite.paste(model_view(folder / left), (0, 0))
    composite.paste(model_view(folder / right), (SIDE, 0))
    composite.save(dataset / COMPOSITE)
    settings = make_settings(base, dataset, tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        assert engine.count() == 3
    return settings, {"left": image_id(left), "right": image_id(right), "composite": image_id(COMPOSITE)}


def half_means(heat: list[list[float]]) -> tuple[float, float]:
    cells = np.asarray(heat)
    half = cells.shape[1] // 2
    return float(cells[:, :half].mean()), float(cells[:, half:].mean())


def test_windows_cover_every_cell():
    covered = np.zeros((DEFAULT_GRID, DEFAULT_GRID), dtype=int)
    for col, row, columns, rows in windows(DEFAULT_GRID):
        assert col + columns <= DEFAULT_GRID and row + rows <= DEFAULT_GRID
        covered[row : row + rows, col : col + columns] += 1
    assert covered.min() >= 1


def test_heat_is_higher_on_the_half_showing_the_query_photo(composite_index):
    settings, ids = composite_index
    with ImageRetrieval(settings, create=False) as engine:
        for side in ("left", "right"):
            vector = engine.store.vector(ids[side])
            found = engine.explain(ids["composite"], [QueryPart(vector=vector)])
            assert found.grid == DEFAULT_GRID and len(found.heat) == len(found.heat[0]) == DEFAULT_GRID
            assert found.windows == len(windows(DEFAULT_GRID))
            assert all(0.0 <= value <= 1.0 for row in found.heat for value in row)
            assert max(max(row) for row in found.heat) == 1.0
            left, right = half_means(found.heat)
            assert (left > right) if side == "left" else (right > left), (side, found.heat)
            left_scores, right_scores = half_means(found.scores)
            assert (left_scores > right_scores) if side == "left" else (right_scores > left_scores)
        small = engine.explain(ids["composite"], [QueryPart(text="a photo")], grid=2)
        assert np.shape(small.heat) == (2, 2)
        with pytest.raises(QueryError, match="grid"):
            engine.explain(ids["composite"], [QueryPart(text="a photo")], grid=40)


def test_post_explain_answers_heat_and_clear_errors(composite_index):
    settings, ids = composite_index
    with ApiServer(settings) as api:
        document = requests.get(f"{api.url}/openapi.json", timeout=10).json()
        schema = {"$ref": "#/components/schemas/Explanation", "components": document["components"]}
        with requests.Session() as http:
            left_vector = http.post(
                f"{api.url}/explain", json={"id": ids["composite"], "similar_to": ids["left"]}, timeout=60
            )
            assert left_vector.status_code == 200, left_vector.text
            body = left_vector.json()
            OAS30Validator(schema).validate(body)
            assert body["id"] == ids["composite"]
            left, right = half_means(body["heat"])
            assert left > right
            text = http.post(
                f"{api.url}/explain", json={"id": ids["left"], "query": "a dog", "grid": 4}, timeout=60
            )
            assert text.status_code == 200 and np.shape(text.json()["heat"]) == (4, 4)

            for payload, status, words in (
                ({"query": "a dog"}, 400, "missing id"),
                ({"id": ids["left"]}, 400, "exactly one of"),
                ({"id": ids["left"], "query": "a dog", "vector": [1.0]}, 400, "exactly one of"),
                ({"id": ids["left"], "vector": [1.0, 2.0]}, 400, "numbers"),
                ({"id": ids["left"], "vector": ["x"]}, 400, "list of numbers"),
                ({"id": ids["left"], "vector": [10**400]}, 400, "finite"),
                ({"id": ids["left"], "query": "a dog", "grid": 99}, 400, "grid"),
                ({"id": ids["left"], "query": "a dog", "colour": 1}, 400, "unknown field 'colour'"),
                ({"id": "nope", "query": "a dog"}, 404, "no indexed image"),
                ({"id": ids["left"], "similar_to": "nope"}, 404, "no indexed image"),
            ):
                answer = http.post(f"{api.url}/explain", json=payload, timeout=30)
                assert answer.status_code == status, (payload, answer.text)
                assert words in answer.json()["error"], (payload, answer.text)
