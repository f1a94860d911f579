"""Issue 2: the engine, incremental indexing and the embed_images.py command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
from data_factory import write_broken_files
from in_process import run_main
from PIL import Image

from config import Settings
from errors import IndexingRefused, ModelMismatch
from image_retrieval import ImageRetrieval

ROOT = Path(__file__).resolve().parents[1]


def run_embed(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python embed_images.py --quiet ARGS` with these settings, run in this process."""
    import embed_images

    return run_main(embed_images.main, ["--quiet", *args], {**settings_env(settings), **(env or {})})


def settings_env(settings: Settings) -> dict[str, str]:
    keys = (
        "DATASET_FOLDER",
        "CHROMA_DB_PATH",
        "MODEL_NAME",
        "DEVICE",
        "BATCH_SIZE",
        "CHROMA_HOST",
        "CHROMA_PORT",
    )
    return {key: str(getattr(settings, key)) for key in keys}


def summary_counts(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith("added "))
    counts = {}
    for part in line.split(";")[0].split(", "):
        word, number = part.split()
        counts[word] = int(number)
    counts["encoded"] = int(line.split("encoded ")[1].split()[0])
    return counts


def stored_paths(settings: Settings) -> list[str]:
    with ImageRetrieval(settings) as engine:
        return sorted(metadata["path"] for _, metadata in engine.store.items())


def disk_images(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*.jpg")
        if path.stat().st_size > 0 and not path.name.startswith("truncated")
    )


def test_incremental_indexing_on_real_photos(coco_dataset, settings_for):
    settings = settings_for(coco_dataset)
    valid = len(list(coco_dataset.glob("*.jpg")))
    broken = write_broken_files(coco_dataset, next(coco_dataset.glob("*.jpg")))

    first = run_embed(settings)
    assert first.returncode == 0, first.stderr
    counts = summary_counts(first.stdout)
    assert counts["added"] == valid and counts["failed"] == 3 and counts["encoded"] == valid
    for name in broken:
        assert any(name in line and "skipped" in line for line in first.stderr.splitlines()), name

    second = summary_counts(run_embed(settings).stdout)
    assert second["encoded"] == 0 and second["unchanged"] == valid and second["added"] == 0

    images = sorted(coco_dataset.glob("0*.jpg"))
    images[0].unlink()
    images[1].unlink()
    (coco_dataset / "moved").mkdir()
    images[2].rename(coco_dataset / "moved" / "renamed photo.jpg")
    third = summary_counts(run_embed(settings).stdout)
    assert (third["removed"], third["moved"], third["encoded"], third["added"]) == (2, 1, 0, 0)
    assert stored_paths(settings) == disk_images(coco_dataset)


def test_changed_and_duplicated_files(coco_dataset, settings_for):
    settings = settings_for(coco_dataset)
    run_embed(settings)
    images = sorted(coco_dataset.glob("*.jpg"))
    shutil.copy(images[0], coco_dataset / "copy of first.jpg")
    Image.new("RGB", (300, 200), "red").save(images[1])
    counts = summary_counts(run_embed(settings).stdout)
    assert counts["added"] == 1 and counts["updated"] == 1 and counts["encoded"] == 1
    with ImageRetrieval(settings) as engine:
        by_path = {meta["path"]: image_id for image_id, meta in engine.store.items()}
        original = engine.store.vector(by_path[images[0].name])
        assert np.allclose(engine.store.vector(by_path["copy of first.jpg"]), original)
        assert engine.store.metadata(by_path[images[1].name])["width"] == 300


def test_stored_vectors_equal_reference_encoding(coco_dataset, settings_for, tiny_checkpoint):
    settings = settings_for(coco_dataset)
    big = coco_dataset / "big.jpg"
    Image.open(next(coco_dataset.glob("0*.jpg"))).resize((2400, 1800)).save(big, quality=92)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        model, preprocess = clip.load(str(tiny_checkpoint), device="cpu", jit=False)
        by_path = {meta["path"]: image_id for image_id, meta in engine.store.items()}
        for name, minimum in [(sorted(coco_dataset.glob("0*.jpg"))[3].name, 0.9999), ("big.jpg", 0.995)]:
            with torch.no_grad():
                reference = model.encode_image(preprocess(Image.open(coco_dataset / name)).unsqueeze(0))
            reference = (reference / reference.norm(dim=-1, keepdim=True))[0].numpy()
            assert float(reference @ engine.store.vector(by_path[name])) >= minimum, name
        query = "a dog playing in the park"
        with torch.no_grad():
            text_reference = model.encode_text(clip.tokenize([query]))
        text_reference = (text_reference / text_reference.norm(dim=-1, keepdim=True))[0].numpy()
        assert float(text_reference @ engine.encoder.encode_texts([query])[0]) >= 0.9999


def test_image_queried_by_its_own_vector_comes_first(coco_dataset, settings_for):
    with ImageRetrieval(settings_for(coco_dataset)) as engine:
        engine.index_folder()
        for image_id, _ in engine.store.items()[:10]:
            result = engine.search_image(engine.image_path(image_id), top_k=3, collapse_duplicates=False)
            assert result.hits[0].id == image_id
            assert result.hits[0].score >= 0.999


def test_metadata_of_each_image(coco_dataset, settings_for):
    with ImageRetrieval(settings_for(coco_dataset)) as engine:
        engine.index_folder()
        _, metadata = engine.store.items()[0]
        path = coco_dataset / metadata["path"]
        with Image.open(path) as image:
            assert (metadata["width"], metadata["height"], metadata["format"]) == (*image.size, "JPEG")
        assert metadata["name"] == path.name and metadata["folder"] == ""
        assert metadata["file_size"] == path.stat().st_size
        assert metadata["modified"] == path.stat().st_mtime
        assert len(metadata["content_hash"]) == 64
        stamp = engine.store.recorded()
        assert stamp["model"] == engine.encoder.identity and stamp["dim"] == 32


def test_exif_orientation_is_applied(tmp_path, settings_for):
    dataset = tmp_path / "exif"
    dataset.mkdir()
    upright = Image.new("RGB", (200, 300), "white")
    upright.paste((0, 0, 255), (0, 0, 200, 100))
    rotated = upright.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(dataset / "rotated.jpg", exif=exif, quality=95)
    upright.save(dataset / "upright.jpg", quality=95)
    with ImageRetrieval(settings_for(dataset)) as engine:
        engine.index_folder()
        by_path = {meta["path"]: (image_id, meta) for image_id, meta in engine.store.items()}
        assert (by_path["rotated.jpg"][1]["width"], by_path["rotated.jpg"][1]["height"]) == (200, 300)
        vectors = engine.store.vectors([by_path["rotated.jpg"][0], by_path["upright.jpg"][0]])
        assert float(vectors[0] @ vectors[1]) > 0.99


def test_another_model_is_refused(coco_dataset, settings_for, tmp_path):
    from data_factory import write_tiny_checkpoint

    settings = settings_for(coco_dataset)
    with ImageRetrieval(settings) as engine:
        engine.index_folder()
        count = engine.count()
    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ModelMismatch, match="was built with model"):
        ImageRetrieval(settings.with_overrides(MODEL_NAME=str(other)))
    result = run_embed(settings.with_overrides(MODEL_NAME=str(other)))
    assert result.returncode == 1 and "was built with model" in result.stderr
    assert "Traceback" not in result.stderr
    with ImageRetrieval(settings) as engine:
        assert engine.count() == count


def test_empty_or_missing_folder_never_wipes_the_index(coco_dataset, settings_for, tmp_path):
    settings = settings_for(coco_dataset)
    run_embed(settings)
    count = len(stored_paths(settings))
    missing = run_embed(settings.with_overrides(DATASET_FOLDER=str(tmp_path / "nowhere")))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    moved_away = tmp_path / "elsewhere"
    coco_dataset.rename(moved_away)
    coco_dataset.mkdir()
    empty = run_embed(settings)
    assert empty.returncode == 1 and "refusing" in empty.stderr
    assert len(stored_paths(settings)) == count
    with pytest.raises(IndexingRefused), ImageRetrieval(settings) as engine:
        engine.index_folder()


def test_rebuild_starts_over(coco_dataset, settings_for):
    settings = settings_for(coco_dataset)
    run_embed(settings)
    counts = summary_counts(run_embed(settings, "--rebuild").stdout)
    assert counts["added"] == len(list(coco_dataset.glob("*.jpg"))) and counts["unchanged"] == 0


def test_server_mode_indexing(coco_dataset, settings_for, chroma_server):
    settings = settings_for(coco_dataset, CHROMA_HOST=chroma_server.host, CHROMA_PORT=chroma_server.port)
    write_broken_files(coco_dataset, next(coco_dataset.glob("*.jpg")))
    first = run_embed(settings)
    assert first.returncode == 0, first.stderr
    valid = disk_images(coco_dataset)
    assert summary_counts(first.stdout)["added"] == len(valid)
    assert summary_counts(first.stdout)["failed"] == 3
    assert summary_counts(run_embed(settings).stdout)["encoded"] == 0
    sorted(coco_dataset.glob("0*.jpg"))[0].unlink()
    assert summary_counts(run_embed(settings).stdout)["removed"] == 1
    assert stored_paths(settings) == disk_images(coco_dataset)
    assert not Path(settings.CHROMA_DB_PATH).exists()


def test_a_changed_ef_search_setting_reaches_an_existing_collection(coco_dataset, settings_for):
    settings = settings_for(coco_dataset, HNSW_EF_SEARCH=64)
    with ImageRetrieval(settings) as engine:
        assert engine.store.view().collection.configuration["hnsw"]["ef_search"] == 64
    with ImageRetrieval(settings.with_overrides(HNSW_EF_SEARCH=512)) as engine:
        assert (
            engine.store.client.get_collection(settings.COLLECTION_NAME).configuration["hnsw"]["ef_search"]
            == 512
        )
