"""IMAGE_RUNTIME=onnx and TEXT_RUNTIME=onnx (issue 7, CPU options): the same vectors as torch, from
cached ONNX exports."""

from __future__ import annotations

import clip
import numpy as np
import pytest
import torch
from PIL import Image
from test_indexing import run_embed

from image_retrieval import ImageRetrieval


def reference_vector(checkpoint, path) -> torch.Tensor:
    model, preprocess = clip.load(str(checkpoint), device="cpu", jit=False)
    with torch.no_grad():
        vector = model.encode_image(preprocess(Image.open(path)).unsqueeze(0))[0]
    return vector / vector.norm()


def test_onnx_runtime_stores_the_reference_vectors(coco_dataset, settings_for, tiny_checkpoint, tmp_path):
    cache = tmp_path / "onnx-cache"
    settings = settings_for(coco_dataset, IMAGE_RUNTIME="onnx", ONNX_CACHE_FOLDER=str(cache))
    with ImageRetrieval(settings) as engine:
        summary = engine.index_folder()
        assert summary.failed == 0 and summary.added == engine.count()
        by_path = {meta["path"]: image_id for image_id, meta in engine.store.items()}
        for path in sorted(coco_dataset.glob("*.jpg"))[:5]:
            stored = torch.from_numpy(engine.store.vector(by_path[path.name]))
            assert float(reference_vector(tiny_checkpoint, path) @ stored) >= 0.9999, path.name
            result = engine.search_image(path, top_k=1, collapse_duplicates=False)
            assert result.hits[0].id == by_path[path.name] and result.hits[0].score >= 0.999
    exported = list(cache.glob("*-visual.onnx"))
    assert len(exported) == 1
    exported_at = exported[0].stat().st_mtime_ns
    with ImageRetrieval(settings) as engine:
        assert engine.index_folder().unchanged == engine.count()
    assert exported[0].stat().st_mtime_ns == exported_at, "the cached export is reused"


def test_onnx_text_runtime_encodes_the_reference_vectors_and_ranks_alike(
    coco_dataset, settings_for, tiny_checkpoint, tmp_path, monkeypatch
):
    import clip_encoder

    run = clip_encoder.OnnxTower.encode
    lengths = []
    monkeypatch.setattr(
        clip_encoder.OnnxTower,
        "encode",
        lambda self, tokens: lengths.append(tokens.shape) or run(self, tokens),
    )
    cache = tmp_path / "onnx-cache"
    settings = settings_for(coco_dataset, TEXT_RUNTIME="onnx", ONNX_CACHE_FOLDER=str(cache))
    long_text = "a very long caption about a dog on a beach " * 12  # past 77 tokens: truncated
    batches = [["a dog"], ["a dog", "two people walking along a sandy beach at dawn", ""], [long_text]]
    model, _ = clip.load(str(tiny_checkpoint), device="cpu", jit=False)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        for texts in batches:
            with torch.no_grad():
                reference = model.encode_text(clip.tokenize(texts, truncate=True)).float()
            reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
            cosines = np.sum(engine.encoder.encode_texts(texts) * reference, axis=1)
            assert cosines.min() >= 0.9999, texts
            assert lengths.pop() == (
                len(texts),
                int(clip.tokenize(texts, truncate=True).argmax(dim=-1).max()) + 1,
            )
        found = [hit.id for hit in engine.search_text("a dog", top_k=10, collapse_duplicates=False).hits]
    exported = list(cache.glob("*-text.onnx"))
    assert len(exported) == 1 and not list(cache.glob("*-visual.onnx"))
    exported_at = exported[0].stat().st_mtime_ns
    with ImageRetrieval(settings) as engine:
        again = [hit.id for hit in engine.search_text("a dog", top_k=10, collapse_duplicates=False).hits]
    assert exported[0].stat().st_mtime_ns == exported_at, "the cached export is reused"
    with ImageRetrieval(settings_for(coco_dataset)) as engine:
        by_torch = [hit.id for hit in engine.search_text("a dog", top_k=10, collapse_duplicates=False).hits]
    assert found == again == by_torch


@pytest.mark.parametrize("setting", ["IMAGE_RUNTIME", "TEXT_RUNTIME"])
def test_unknown_runtime_is_a_clear_error(coco_dataset, settings_for, setting):
    process = run_embed(settings_for(coco_dataset), env={setting: "tensorrt"})
    assert process.returncode == 1
    assert f"{setting} must be one of torch, onnx" in process.stderr
    assert "Traceback" not in process.stderr
