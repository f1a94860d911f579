"""Issue 12: the indexing pipeline sized to the machine, each file read once, writes overlapped."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import write_broken_files
from PIL import Image

import loaders
from config import Settings
from errors import IndexingRefused
from image_retrieval import ImageRetrieval
from loaders import KnownHashes, plan_loaders

VOLATILE = ("indexed",)


def index(settings: Settings):
    with ImageRetrieval(settings) as engine:
        summary = engine.index_folder()
        records = {image_id: meta for image_id, meta in engine.store.items()}
        vectors = {image_id: engine.store.vector(image_id) for image_id in records}
    return summary, records, vectors


def stable(meta: dict) -> dict:
    return {key: value for key, value in meta.items() if key not in VOLATILE}


@pytest.mark.parametrize(
    ("device", "cores", "overrides", "expected"),
    [
        ("cuda", 16, {}, (256, 15, True)),
        ("mps", 8, {}, (64, 7, False)),
        ("cpu", 2, {}, (32, 0, False)),
        ("cpu", 16, {"TORCH_THREADS": 4}, (32, 12, False)),
        ("cpu", 4, {"TORCH_THREADS": 3}, (32, 0, False)),  # one spare core: threads
        ("cuda", 16, {"BATCH_SIZE": 64, "LOADER_PROCESSES": 0}, (64, 0, True)),
        ("cuda:1", 16, {}, (256, 15, True)),
        ("cpu", 2, {"LOADER_PROCESSES": 3}, (32, 3, False)),
    ],
)
def test_loaders_are_sized_by_device_and_cores(device, cores, overrides, expected):
    settings = Settings().with_overrides(**overrides)
    plan = plan_loaders(settings, device, cores, model_threads=settings.TORCH_THREADS or cores)
    assert (plan.batch_size, plan.processes, plan.pin_memory) == expected
    assert plan.overlap_writes == (device != "cpu" or cores > (settings.TORCH_THREADS or cores))
    assert plan.threads == settings.LOADER_THREADS


@pytest.mark.parametrize(
    ("name", "value"), [("BATCH_SIZE", -1), ("LOADER_PROCESSES", -2), ("LOADER_THREADS", 0)]
)
def test_bad_loader_settings_are_refused_with_the_setting_named(name, value):
    with pytest.raises(IndexingRefused, match=name):
        plan_loaders(Settings().with_overrides(**{name: value}), "cpu", 2)


def test_worker_processes_index_exactly_as_threads_do(tmp_path, coco_dataset, settings_for, caplog):
    write_broken_files(coco_dataset, next(coco_dataset.glob("*.jpg")))
    by_threads = settings_for(coco_dataset, BATCH_SIZE=8, LOADER_PROCESSES=0)
    by_processes = by_threads.with_overrides(
        LOADER_PROCESSES=2, CHROMA_DB_PATH=str(tmp_path / "by_processes")
    )
    threads_summary, threads_records, threads_vectors = index(by_threads)
    with caplog.at_level(logging.INFO, logger="loaders"):
        processes_summary, processes_records, processes_vectors = index(by_processes)
    assert "decoding on 2 worker processes, 8 images per batch" in caplog.text

    assert processes_summary.encoded == threads_summary.encoded > 100
    assert sorted(processes_summary.failures) == sorted(threads_summary.failures)
    assert len(threads_summary.failures) == 3
    assert processes_records.keys() == threads_records.keys()
    for image_id, meta in threads_records.items():
        assert stable(processes_records[image_id]) == stable(meta)
        assert np.allclose(processes_vectors[image_id], threads_vectors[image_id], atol=1e-6)


def test_each_new_file_is_read_once(coco_dataset, settings_for):
    opened: list[str] = []
    root = str(coco_dataset.resolve())
    listening = threading.Event()

    def on_open(event: str, args: tuple) -> None:
        if listening.is_set() and event == "open" and isinstance(args[0], str | Path):
            path = str(args[0])
            if path.startswith(root) and (args[1] or "r").startswith("r"):
                opened.append(path)

    sys.addaudithook(on_open)
    with ImageRetrieval(settings_for(coco_dataset, LOADER_PROCESSES=0)) as engine:
        listening.set()
        try:
            summary = engine.index_folder()
        finally:
            listening.clear()
    images = sorted(str(path.resolve()) for path in coco_dataset.glob("*.jpg"))
    assert summary.encoded == len(images)
    assert sorted(opened) == images


def test_moves_and_copies_reuse_vectors_without_decoding(coco_dataset, settings_for):
    settings = settings_for(coco_dataset)
    first, _, vectors = index(settings)
    photos = sorted(coco_dataset.glob("*.jpg"))
    old_vector = vectors[path_id(settings, photos[0])]
    shutil.move(photos[0], coco_dataset / "moved.jpg")
    shutil.copy(coco_dataset / "moved.jpg", coco_dataset / "second copy of the moved.jpg")
    # A changed file whose old content turns up under a new name: the copy gets the old content's
    # vector. It is encoded again, as the changed file's record is rewritten in the same run.
    changed_vector = vectors[path_id(settings, photos[1])]
    shutil.copy(photos[1], coco_dataset / "old content of the changed.jpg")
    Image.new("RGB", (320, 240), "blue").save(photos[1])

    summary, records, after = index(settings)
    assert (summary.moved, summary.added, summary.updated, summary.encoded) == (1, 2, 1, 2)
    assert summary.removed == 0 and len(records) == first.encoded + 2
    assert np.allclose(after[path_id(settings, coco_dataset / "moved.jpg")], old_vector)
    assert np.allclose(after[path_id(settings, coco_dataset / "second copy of the moved.jpg")], old_vector)
    assert np.allclose(
        after[path_id(settings, coco_dataset / "old content of the changed.jpg")], changed_vector
    )
    assert not np.allclose(after[path_id(settings, photos[1])], changed_vector)


def test_a_file_matched_only_by_its_hash_prefix_is_encoded(coco_dataset, settings_for):
    """KnownHashes compares 64-bit prefixes; the whole hash decides whether a stored vector is reused."""
    settings = settings_for(coco_dataset)
    index(settings)
    photos = sorted(coco_dataset.glob("*.jpg"))
    newcomer = coco_dataset / "newcomer.jpg"
    Image.new("RGB", (200, 200), "green").save(newcomer)
    with ImageRetrieval(settings) as engine:
        real = engine.store.metadata(path_id(settings, photos[0]))
        newcomer_hash = hashlib.sha256(newcomer.read_bytes()).hexdigest()
        lookalike = newcomer_hash[:16] + "0" * 48
        assert lookalike in KnownHashes([lookalike]) and newcomer_hash in KnownHashes([lookalike])
        engine.store.update_metadata([path_id(settings, photos[0])], [real | {"content_hash": lookalike}])
    photos[0].unlink()

    summary, records, _ = index(settings)
    assert (summary.added, summary.moved, summary.removed, summary.encoded) == (1, 0, 1, 1)
    assert path_id(settings, newcomer) in records


def test_the_model_encodes_the_next_batch_while_a_batch_is_written(coco_dataset, settings_for, monkeypatch):
    monkeypatch.setattr(loaders, "available_cores", lambda: torch.get_num_threads() + 1)  # one spare core
    settings = settings_for(coco_dataset, BATCH_SIZE=16, LOADER_PROCESSES=0)
    batches = -(-len(list(coco_dataset.glob("*.jpg"))) // 16)
    with ImageRetrieval(settings) as engine:
        encodings = threading.Semaphore(0)
        overlapped: list[bool] = []
        encode, write = engine.encoder.encode_pixels, engine.store.write

        def counting_encode(pixels):
            encodings.release()
            return encode(pixels)

        def write_once_the_next_batch_is_encoding(ids, vectors, metadatas):
            encodings.acquire(timeout=30)  # this batch's own encoding
            if len(overlapped) < batches - 1:
                overlapped.append(encodings.acquire(timeout=30))  # the next batch's, while writing
                encodings.release()
            write(ids, vectors, metadatas)

        engine.encoder.encode_pixels = counting_encode
        engine.store.write = write_once_the_next_batch_is_encoding
        summary = engine.index_folder()
    assert summary.encoded > 100 and overlapped == [True] * (batches - 1)


def path_id(settings: Settings, path: Path) -> str:
    from indexer import image_id

    return image_id(path.resolve().relative_to(Path(settings.DATASET_FOLDER).resolve()).as_posix())


def test_writes_wait_for_the_store_where_the_model_uses_every_core(coco_dataset, settings_for, monkeypatch):
    monkeypatch.setattr(loaders, "available_cores", torch.get_num_threads)
    settings = settings_for(coco_dataset, BATCH_SIZE=16, LOADER_PROCESSES=0)
    with ImageRetrieval(settings) as engine:
        writing = threading.Event()
        encoded_while_writing: list[bool] = []
        encode, write = engine.encoder.encode_pixels, engine.store.write

        def noting_encode(pixels):
            encoded_while_writing.append(writing.is_set())
            return encode(pixels)

        def slow_write(ids, vectors, metadatas):
            writing.set()
            time.sleep(0.05)
            write(ids, vectors, metadatas)
            writing.clear()

        engine.encoder.encode_pixels = noting_encode
        engine.store.write = slow_write
        summary = engine.index_folder()
    assert summary.encoded > 100 and len(encoded_while_writing) > 5 and not any(encoded_while_writing)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_batch_pinned_by_the_dataloader_keeps_its_files():
    batch = loaders.LoadedBatch(torch.zeros(2, 3, 4, 4), [loaders.Loaded("a"), loaders.Loaded("b")])
    pinned = batch.pin_memory()
    assert pinned.pixels.is_pinned() and pinned.files == batch.files
