"""Issue 12: JPEGs decoded and preprocessed on the model's device (IMAGE_DECODE), with CPU fallbacks.

Without a GPU the same code runs on torchvision's CPU decoder, which is what CI checks; the CUDA case
runs where there is one.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from corrupt_corpus import bad_exif_jpeg, jpeg_bytes, scene
from data_factory import write_broken_files
from PIL import Image

import device_decode
from device_decode import (
    AGREEMENT,
    Calibration,
    DeviceDecoder,
    calibrate,
    device_jpeg,
    shrink_factor,
    upright,
)
from errors import ImageLoadError, IndexingRefused
from image_io import UPRIGHT, decode_for_model
from image_retrieval import ImageRetrieval
from loaders import plan_loaders

MEGAPIXELS = 100.0


def photos(folder: Path, count: int = 24) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.glob("*.jpg"))[:count]]


def twelve_megapixels(photo: bytes) -> bytes:
    with Image.open(io.BytesIO(photo)) as image:
        return jpeg_bytes(image.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC))


def with_orientation(photo: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(photo)) as image:
        return jpeg_bytes(image.convert("RGB"), exif=exif.tobytes())


def both_paths(encoder, files: list[bytes], device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The vectors of `files` by the CPU path and by the device path."""
    resolution = encoder.input_resolution
    cpu = torch.stack(
        [encoder.preprocess(decode_for_model(data, resolution, MEGAPIXELS)[0]) for data in files]
    )
    decoder = DeviceDecoder(device, resolution, MEGAPIXELS, encoder.preprocess)
    handed = [device_jpeg(data, MEGAPIXELS) for data in files]
    assert all(item is not None for item in handed)
    on_device = torch.stack(decoder.pixels([item[0] for item in handed])).cpu()
    return encoder.encode_pixels(cpu), encoder.encode_pixels(on_device)


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_upright_turns_tensors_as_pillow_turns_images(orientation):
    image = scene((7, 5), orientation)
    expected = np.asarray(image.transpose(UPRIGHT[orientation]))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert np.array_equal(upright(pixels, orientation).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("size", [(640, 426), (300, 200), (4000, 3000), (8000, 6000), (12000, 400)])
def test_the_device_shrinks_as_the_cpu_path_drafts(size):
    resolution = 224
    drafted, _ = decode_for_model(jpeg_bytes(Image.new("RGB", size, "teal")), resolution, 200.0)
    short = min(size)
    factor = shrink_factor(short, resolution)
    assert abs(min(drafted.size) - short / factor) <= 1, (drafted.size, factor)


def test_device_vectors_agree_with_the_cpu_path_on_photos_and_12_megapixels(encoder, coco_source):
    files = photos(coco_source[0])
    files += [twelve_megapixels(photo) for photo in files[:3]]
    files += [with_orientation(files[0], orientation) for orientation in (3, 6, 8)]
    cpu, on_device = both_paths(encoder, files)
    assert np.sum(cpu * on_device, axis=1).min() >= AGREEMENT


def test_what_the_device_cannot_decode_falls_back_to_the_cpu_path(encoder, coco_source):
    photo = photos(coco_source[0], 1)[0]
    broken = bad_exif_jpeg()
    truncated = photo[: len(photo) // 2]
    handed = [device_jpeg(data, MEGAPIXELS) for data in (photo, broken, truncated, b"not a jpeg")]
    assert handed[3] is None
    decoder = DeviceDecoder("cpu", encoder.input_resolution, MEGAPIXELS, encoder.preprocess)
    results = decoder.pixels([item[0] for item in handed[:3]])
    photo_result, broken_result, truncated_result = results
    for data, result in ((photo, photo_result), (broken, broken_result)):
        expected = encoder.preprocess(decode_for_model(data, encoder.input_resolution, MEGAPIXELS)[0])
        assert isinstance(result, torch.Tensor), result
        cosine = encoder.encode_pixels(result[None]) @ encoder.encode_pixels(expected[None]).T
        assert cosine.item() >= AGREEMENT
    with pytest.raises(ImageLoadError) as refused:
        decode_for_model(truncated, encoder.input_resolution, MEGAPIXELS)
    assert truncated_result == str(refused.value)


def test_cmyk_and_other_formats_stay_on_the_cpu_path(coco_source):
    photo = photos(coco_source[0], 1)[0]
    with Image.open(io.BytesIO(photo)) as image:
        cmyk = jpeg_bytes(image.convert("CMYK"))
        png = io.BytesIO()
        image.save(png, "PNG")
    assert device_jpeg(cmyk, MEGAPIXELS) is None
    assert device_jpeg(png.getvalue(), MEGAPIXELS) is None
    assert device_jpeg(photo, MEGAPIXELS) is not None


def test_indexing_with_gpu_decoding_matches_cpu_decoding(
    tmp_path, coco_dataset, settings_for, caplog, monkeypatch
):
    on_device: list[int] = []
    decode = DeviceDecoder.pixels

    def counted(decoder, jpegs):
        on_device.append(len(jpegs))
        return decode(decoder, jpegs)

    monkeypatch.setattr(DeviceDecoder, "pixels", counted)
    broken = write_broken_files(coco_dataset, next(coco_dataset.glob("*.jpg")))
    (coco_dataset / "turned.jpg").write_bytes(with_orientation(photos(coco_dataset, 1)[0], 6))
    by_cpu = settings_for(coco_dataset, IMAGE_DECODE="cpu", LOADER_PROCESSES=0)
    results = {}
    for label, settings in (
        ("cpu", by_cpu),
        ("gpu threads", by_cpu.with_overrides(IMAGE_DECODE="gpu", CHROMA_DB_PATH=str(tmp_path / "a"))),
        (
            "gpu processes",
            by_cpu.with_overrides(IMAGE_DECODE="gpu", LOADER_PROCESSES=2, CHROMA_DB_PATH=str(tmp_path / "b")),
        ),
    ):
        with caplog.at_level(logging.WARNING, logger="device_decode"), ImageRetrieval(settings) as engine:
            summary = engine.index_folder()
            records = dict(engine.store.items())
            results[label] = summary, records, {key: engine.store.vector(key) for key in records}
    assert "IMAGE_DECODE=gpu on cpu" in caplog.text
    jpegs = len(list(coco_dataset.glob("*.jpg"))) - 1  # all but the empty one (the truncated fails there)
    assert sum(on_device) == 2 * jpegs
    summary, records, vectors = results["cpu"]
    assert sorted(path for path, _ in summary.failures) == sorted(broken)
    for label in ("gpu threads", "gpu processes"):
        gpu_summary, gpu_records, gpu_vectors = results[label]
        assert sorted(gpu_summary.failures) == sorted(summary.failures), label
        assert gpu_records.keys() == records.keys()
        for key, meta in records.items():
            assert {**gpu_records[key], "indexed": 0} == {**meta, "indexed": 0}, label
            assert float(np.dot(gpu_vectors[key], vectors[key])) >= AGREEMENT, (label, meta["path"])


def test_a_bad_image_decode_setting_is_refused_with_the_setting_named():
    from config import Settings

    with pytest.raises(IndexingRefused, match="IMAGE_DECODE must be one of auto, cpu, gpu"):
        plan_loaders(Settings(IMAGE_DECODE="nvjpeg"), "cpu", 2)


def test_calibration_measures_both_paths_on_the_runs_own_files(encoder, coco_dataset):
    paths = [*sorted(coco_dataset.glob("*.jpg")), coco_dataset / "missing.jpg"]
    (coco_dataset / "a.png").write_bytes(b"not an image")
    calibration = calibrate(encoder, [coco_dataset / "a.png", *paths], loaders=2, max_megapixels=MEGAPIXELS)
    assert calibration is not None
    assert calibration.files == min(len(paths) - 1, device_decode.SAMPLE_FILES)
    assert calibration.agreement >= AGREEMENT
    assert min(calibration.model_rate, calibration.device_rate, calibration.cpu_rate) > 0
    assert calibrate(encoder, [coco_dataset / "a.png"], 2, MEGAPIXELS) is None


@pytest.mark.parametrize(
    ("agreement", "model", "device", "cpu", "wins"),
    [
        (0.9999, 1000, 8000, 500, True),  # the CPU is the ceiling; the device adds little to the model
        (0.9999, 1000, 1000, 900, False),  # in series with the model the device halves it
        (0.99, 1000, 8000, 500, False),  # too far from the CPU path's vectors
        (0.9999, 400, 8000, 1000, False),  # the model is the ceiling either way
    ],
)
def test_auto_takes_the_device_only_where_faster_and_close(agreement, model, device, cpu, wins):
    assert Calibration(64, agreement, model, device, cpu).device_wins is wins


def test_auto_decodes_on_the_cpu_without_cuda(encoder, coco_dataset):
    from config import Settings

    paths = sorted(coco_dataset.glob("*.jpg")) * 10
    assert device_decode.decodes_on_device(Settings(IMAGE_DECODE="auto"), encoder, paths, 2) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_vectors_agree_with_the_cpu_path(tiny_checkpoint, coco_source):
    from clip_encoder import ClipEncoder

    gpu_encoder = ClipEncoder(str(tiny_checkpoint), "cuda")
    files = photos(coco_source[0])
    files += [twelve_megapixels(photo) for photo in files[:3]]
    cpu, on_device = both_paths(gpu_encoder, files, "cuda")
    assert np.sum(cpu * on_device, axis=1).min() >= AGREEMENT


@pytest.mark.parametrize("wins", [True, False])
def test_auto_on_cuda_follows_the_calibration_for_large_runs(monkeypatch, caplog, wins):
    from types import SimpleNamespace

    from config import Settings

    measured = Calibration(64, 0.9999, 1000, 8000 if wins else 100, 500)
    calls = []
    monkeypatch.setattr(device_decode, "calibrate", lambda *args: calls.append(args) or measured)
    gpu = SimpleNamespace(device="cuda")  # no GPU here: only the choice is tested
    large, small = [Path(f"{index}.jpg") for index in range(1000)], [Path("a.jpg")] * 10
    with caplog.at_level(logging.INFO, logger="device_decode"):
        assert device_decode.decodes_on_device(Settings(IMAGE_DECODE="auto"), gpu, large, 15) is wins
    assert len(calls) == 1 and calls[0][2] == 15
    assert ("JPEGs decoded on cuda" if wins else "JPEGs decoded on the CPU") in caplog.text
    assert device_decode.decodes_on_device(Settings(IMAGE_DECODE="auto"), gpu, small, 15) is False
    assert len(calls) == 1


def test_chunking_keeps_each_files_result_and_order(encoder, coco_source, monkeypatch):
    files = photos(coco_source[0], 6)
    jpegs = [device_jpeg(data, MEGAPIXELS)[0] for data in files]
    decoder = DeviceDecoder("cpu", encoder.input_resolution, MEGAPIXELS, encoder.preprocess)
    together = decoder.pixels(jpegs)
    monkeypatch.setattr(device_decode, "CHUNK_PIXELS", jpegs[0].size + 1)
    alone = decoder.pixels(jpegs)
    assert all(torch.equal(first, second) for first, second in zip(together, alone, strict=True))
