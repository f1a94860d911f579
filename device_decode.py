"""JPEG decoding and CLIP preprocessing on the model's device (IMAGE_DECODE=gpu; nvJPEG on CUDA).

The loaders still read, hash and parse each file's header (its size, format and EXIF block); a JPEG
they would decode on the CPU comes to this process as its bytes instead, and is decoded in batches on
the model's device, shrunk the way Pillow's draft decode shrinks it on the CPU path, stood upright,
resized (bicubic, antialiased), centre-cropped and normalised there. A file the device cannot decode
falls back to the CPU path. `choose_device_decoding` measures, on a sample of the run's own files,
whether this is faster end to end than decoding on the CPU and close to its vectors (IMAGE_DECODE=auto).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as functional
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as transforms

from errors import ImageLoadError
from image_io import DRAFT_MARGIN, MAX_ASPECT_RATIO, ImageFacts, decode_for_model, image_facts, open_image

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)

IMAGE_DECODES = ("auto", "cpu", "gpu")
# Pillow modes of the JPEGs the device decodes; CMYK and other rare ones stay on the CPU path.
DEVICE_MODES = ("RGB", "L")
# Decoded pixels held on the device at once, per decode call: 12 MP photos come in several calls.
CHUNK_PIXELS = 256_000_000
# IMAGE_DECODE=auto decodes on the device only where the sample's vectors agree at least this well.
AGREEMENT = 0.999
SAMPLE_FILES = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Draft decoding shrinks a JPEG by one of these factors (the DCT scales libjpeg offers).
DRAFT_FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class DeviceJpeg:
    """What a loader hands over for the device to decode: the file's bytes and its EXIF orientation."""

    data: bytes  # the whole file: bytes pickle through the worker's pipe, no shared-memory handle each
    size: int  # pixels, from the header
    orientation: int = 1


def device_jpeg(data: bytes, max_megapixels: float) -> tuple[DeviceJpeg, ImageFacts] | None:
    """A JPEG the device can decode, with its facts; None for anything else (the CPU path decides)."""
    try:
        image = open_image(data, max_megapixels)
    except ImageLoadError:
        return None
    if image.format != "JPEG" or image.mode not in DEVICE_MODES:
        return None
    facts, orientation = image_facts(image)
    return DeviceJpeg(data, facts.width * facts.height, orientation), facts


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """`image_io.upright` for a C x H x W tensor."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1, -2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(pixels, -1, (-2, -1))
    if orientation == 7:
        return pixels.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(pixels, 1, (-2, -1))
    return pixels


def shrink_factor(short_side: int, resolution: int) -> int:
    """The whole factor the CPU path shrinks by before its resize: Pillow's draft (a DCT scale keeping
    the short side >= the model's input), then `image_io._reduced` down to twice that."""
    wanted = DRAFT_MARGIN * resolution
    draft = next((factor for factor in DRAFT_FACTORS if math.ceil(short_side / factor) >= wanted), 1)
    reduce = math.ceil(short_side / draft) // (2 * resolution)
    return draft * (reduce if reduce >= 2 else 1)


class DeviceDecoder:
    """Decodes the JPEGs of a batch on `device` into the model's preprocessed input."""

    def __init__(self, device: str, resolution: int, max_megapixels: float, preprocess: Callable) -> None:
        self.device = torch.device(device)
        self.resolution = resolution
        self.max_megapixels = max_megapixels
        self.preprocess = preprocess
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)

    @torch.inference_mode()
    def pixels(self, jpegs: Sequence[DeviceJpeg]) -> list[torch.Tensor | str]:
        """Each file's model input (3 x R x R, on the device), or why neither path could decode it."""
        results: list[torch.Tensor | str] = []
        for chunk in _chunks(jpegs):
            files = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in chunk]
            for jpeg, image in zip(chunk, self._decoded(files), strict=True):
                on_device = image is not None
                results.append(self._prepared(image, jpeg.orientation) if on_device else self._on_cpu(jpeg))
        return results

    def _decoded(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched decoding; when one file breaks the batch, each is decoded alone (None: it failed)."""
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            return [self._decoded_alone(data) for data in files]

    def _decoded_alone(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            log.debug("the device could not decode a JPEG (%s): decoding it on the CPU", error)
            return None

    def _prepared(self, image: torch.Tensor, orientation: int) -> torch.Tensor:
        pixels = image.float()
        factor = shrink_factor(min(pixels.shape[-2:]), self.resolution)
        if factor > 1:
            pixels = functional.avg_pool2d(pixels[None], factor, ceil_mode=True)[0]
        pixels = _model_view(upright(pixels, orientation))
        pixels = transforms.resize(
            pixels, [self.resolution], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        pixels = transforms.center_crop(pixels, [self.resolution])
        return ((pixels.clamp(0, 255).round() / 255) - self.mean) / self.std

    def _on_cpu(self, jpeg: DeviceJpeg) -> torch.Tensor | str:
        try:
            image, _ = decode_for_model(jpeg.data, self.resolution, self.max_megapixels)
            return self.preprocess(image).to(self.device)
        except ImageLoadError as error:
            return str(error)
        except Exception as error:  # one bad file never stops the run
            return f"cannot decode: {error}"


def _chunks(jpegs: Sequence[DeviceJpeg]) -> list[list[DeviceJpeg]]:
    """`jpegs` in runs whose decoded pixels fit CHUNK_PIXELS (one file alone may be larger)."""
    chunks: list[list[DeviceJpeg]] = [[]]
    pixels = 0
    for jpeg in jpegs:
        if chunks[-1] and pixels + jpeg.size > CHUNK_PIXELS:
            chunks.append([])
            pixels = 0
        chunks[-1].append(jpeg)
        pixels += jpeg.size
    return [chunk for chunk in chunks if chunk]


def _model_view(pixels: torch.Tensor) -> torch.Tensor:
    """`image_io._model_view` for a C x H x W tensor: the centre of a very elongated image."""
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    keep = 2 * short + 8
    if long <= MAX_ASPECT_RATIO * short or long <= keep:
        return pixels
    start = (long - keep) // 2
    return pixels[..., :, start : start + keep] if width > height else pixels[..., start : start + keep, :]


@dataclass(frozen=True)
class Calibration:
    """What IMAGE_DECODE=auto measured on a sample of the run's JPEGs."""

    files: int
    agreement: float  # the lowest cosine between a file's vectors by the two paths
    model_rate: float  # images/s
    device_rate: float  # images/s of decoding + preprocessing on the device
    cpu_rate: float  # images/s of decoding + preprocessing on the CPU, times its loaders

    @property
    def device_wins(self) -> bool:
        """Closer than AGREEMENT and faster end to end: device decoding runs in series with the model,
        CPU decoding beside it."""
        serial = 1 / (1 / self.model_rate + 1 / self.device_rate)
        return self.agreement >= AGREEMENT and serial > min(self.model_rate, self.cpu_rate)


def calibrate(encoder: Any, paths: Sequence[Path], loaders: int, max_megapixels: float) -> Calibration | None:
    """Both paths timed on up to SAMPLE_FILES of `paths`; None when the sample holds no JPEG."""
    decoder = DeviceDecoder(encoder.device, encoder.input_resolution, max_megapixels, encoder.preprocess)
    jpegs, on_cpu = [], []
    started = time.perf_counter()
    for path in paths[: 4 * SAMPLE_FILES]:
        with contextlib.suppress(OSError, ImageLoadError):
            data = path.read_bytes()
            handed = device_jpeg(data, max_megapixels)
            if handed is not None and len(jpegs) < SAMPLE_FILES:
                image, _ = decode_for_model(data, encoder.input_resolution, max_megapixels)
                on_cpu.append(encoder.preprocess(image))
                jpegs.append(handed[0])
    if not jpegs:
        return None
    cpu_rate = len(jpegs) / (time.perf_counter() - started) * max(loaders, 1)
    decoder.pixels(jpegs[:2])  # the first call starts the decoder
    device_pixels, device_seconds = _timed(lambda: torch.stack(decoder.pixels(jpegs)), encoder.device)
    cpu_vectors, model_seconds = _timed(lambda: encoder.encode_pixels(torch.stack(on_cpu)), encoder.device)
    device_vectors = encoder.encode_pixels(device_pixels)
    agreement = float(np.min(np.sum(cpu_vectors * device_vectors, axis=1)))
    count = len(jpegs)
    return Calibration(count, agreement, count / model_seconds, count / device_seconds, cpu_rate)


def decodes_on_device(settings: Settings, encoder: Any, paths: Sequence[Path], loaders: int) -> bool:
    """IMAGE_DECODE for this run: "gpu" always (torchvision's CPU decoder where there is no GPU),
    "auto" on CUDA where `calibrate` finds it faster and close, for runs of more than a sample."""
    choice = settings.IMAGE_DECODE
    on_cuda = torch.device(encoder.device).type == "cuda"
    if choice == "gpu" and not on_cuda:
        log.warning("IMAGE_DECODE=gpu on %s: JPEGs are decoded by torchvision on the CPU", encoder.device)
    if choice != "auto":
        return choice == "gpu"
    if not on_cuda or len(paths) <= 4 * SAMPLE_FILES:
        return False
    calibration = calibrate(encoder, paths, loaders, settings.MAX_IMAGE_MEGAPIXELS)
    if calibration is None:
        return False
    log.info(
        "IMAGE_DECODE=auto: JPEGs decoded on %s (%d sample files: cosine >= %.4f to the CPU path; "
        "device %.0f, CPU %.0f, model %.0f images/s)",
        encoder.device if calibration.device_wins else "the CPU",
        calibration.files,
        calibration.agreement,
        calibration.device_rate,
        calibration.cpu_rate,
        calibration.model_rate,
    )
    return calibration.device_wins


def _timed(work: Callable[[], Any], device: str) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started
