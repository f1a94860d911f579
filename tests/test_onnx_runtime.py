"""IMAGE_RUNTIME=onnx (issue 7, CPU options): the same vectors as torch, from a cached ONNX export."""

from __future__ import annotations

import clip
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


def test_unknown_image_runtime_is_a_clear_error(coco_dataset, settings_for):
    process = run_embed(settings_for(coco_dataset), env={"IMAGE_RUNTIME": "tensorrt"})
    assert process.returncode == 1
    assert "IMAGE_RUNTIME must be one of torch, onnx" in process.stderr
    assert "Traceback" not in process.stderr
