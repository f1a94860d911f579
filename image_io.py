"""Reading image files safely: finding them, decoding them for the model, hashing, thumbnails."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import io
import logging
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, UnidentifiedImageError

from errors import ImageLoadError

# HEIC/HEIF (iPhone photos) through pillow-heif; AVIF through Pillow's own plugin (Pillow >= 11.3).
pillow_heif.register_heif_opener()
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# JPEGs are draft-decoded (DCT scaling) to at least this multiple of the model's input size. At 1,
# a 12 MP photo decodes 17-30% faster than at 2 and its vector keeps cosine >= 0.9999 with a full decode.
DRAFT_MARGIN = 1
# Images longer than this multiple of their short side are cropped around the centre before encoding.
MAX_ASPECT_RATIO = 4

# Pillow's `info` keys of a JPEG's metadata blocks: a file holding one is never sent as its own thumbnail.
METADATA_BLOCKS = frozenset({"exif", "xmp", "comment", "photoshop", "iptc"})
OWN_THUMBNAIL_BYTES_PER_PIXEL = 1
OWN_THUMBNAIL_HEADER_BYTES = 4096

# The formats a file or an upload may be in: the common photo formats. Others that Pillow can read (ICO,
# PPM, SGI, DDS, JPEG 2000, ...) are refused up front rather than decoded by rarely used code.
PHOTO_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF", "AVIF", "HEIF")
# EXIF orientation -> the transpose that makes the picture stand upright.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
ImageSource = Path | bytes | BinaryIO

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = None  # the megapixel limit is enforced by `open_image` itself


# Bytes a decoded pixel takes in Pillow's memory, by mode; every other mode takes 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Rows converted at a time when a 16-bit or float image is scaled down to 8 bits.
_BAND_ROWS = 256


def decode_bytes(image: Image.Image) -> int:
    """An upper bound of the memory that decoding `image` and converting it to RGB takes.

    The decoded pixels, an 8-bit copy, the RGB image, and for transparency two more RGBA images.
    """
    transparency = image.mode in ("RGBA", "LA", "PA", "P")
    return image.width * image.height * (_PIXEL_BYTES.get(image.mode, 4) + 1 + 4 + (8 if transparency else 0))


class DecodeBudget:
    """Memory for decoding images, shared by every thread of the process (DECODE_MEMORY_MB).

    A decode reserves its `decode_bytes` first and waits while other decodes hold the budget, so any
    number of concurrent uploads and loader threads stay within it; one that alone exceeds it is refused.
    """

    def __init__(self, megabytes: float) -> None:
        self.limit = int(megabytes * 2**20)
        self._used = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.limit:
            raise ImageLoadError(
                f"too large to decode: needs about {nbytes / 2**20:.0f} MB, "
                f"over DECODE_MEMORY_MB={self.limit / 2**20:g}"
            )
        with self._free:
            self._free.wait_for(lambda: self._used + nbytes <= self.limit)
            self._used += nbytes
        try:
            yield
        finally:
            with self._free:
                self._used -= nbytes
                self._free.notify_all()


DECODE_BUDGET = DecodeBudget(2048)


def set_decode_memory(megabytes: float) -> None:
    """Set the process's decode budget (the engine does, from DECODE_MEMORY_MB)."""
    DECODE_BUDGET.limit = int(megabytes * 2**20)
    _return_large_buffers_to_the_system()


def _return_large_buffers_to_the_system() -> None:
    """Make glibc map every allocation over 1 MB on its own and unmap it when freed.

    By default glibc raises that threshold after the first large free, so decode buffers land in
    per-thread arenas that keep their memory: eight threads decoding one after the other then held
    eight decodes' worth, whatever the budget. Elsewhere than glibc this does nothing.
    """
    libc_name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None) if libc_name else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    format: str
    exif: Image.Exif | None = None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(root: Path) -> Iterator[Path]:
    """Image files under `root`, recursively, following symlinks to folders once each (no loops)."""
    seen_folders: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_folders:
            subfolders.clear()
            continue
        seen_folders.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        for name in sorted(files):
            if is_image_name(name) and not name.startswith("."):
                yield Path(folder, name)


def open_inside(root: Path, relative: str) -> tuple[BinaryIO, os.stat_result]:
    """Open `root/relative` once and check the file that was opened: a regular file inside `root`.

    No check-then-open: the kernel is asked where the opened descriptor itself lies, so a path swapped
    for a symlink to a file elsewhere, at any moment, is refused (`PermissionError`) rather than read.
    `root` must be resolved.
    """
    descriptor = os.open(root / relative, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode):
            raise PermissionError(f"{relative} is not a regular file")
        if not Path(_descriptor_path(descriptor, root, relative, opened)).is_relative_to(root):
            raise PermissionError(f"{relative} points outside the dataset folder")
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb"), opened


def _descriptor_path(descriptor: int, root: Path, relative: str, opened: os.stat_result) -> str:
    """Where the open file lies: from the kernel (Linux, macOS), else the path re-resolved and compared."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{descriptor}")
    if hasattr(fcntl, "F_GETPATH"):
        return os.fsdecode(fcntl.fcntl(descriptor, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
    real = os.path.realpath(root / relative)
    current = os.stat(real, follow_symlinks=False)
    if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
        raise PermissionError(f"{relative} changed while it was being opened")
    return real


def file_hash(source: Path | BinaryIO) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source) as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_image(source: ImageSource, max_megapixels: float) -> Image.Image:
    """Open an image without decoding its pixels, refusing what is not a photo format or too large."""
    try:
        if _source_size(source) == 0:
            raise ImageLoadError("empty file (0 bytes)")
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": the EXIF block is just not used
            image = Image.open(stream, formats=_photo_formats())
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"not an image (unrecognised format; accepted: {', '.join(_photo_formats())})"
        ) from None
    except OSError as error:
        raise ImageLoadError(f"cannot read: {error.strerror or error}") from None
    except Exception as error:  # Pillow's header parsers raise many kinds of errors on hostile data
        raise ImageLoadError(f"corrupt image header ({type(error).__name__})") from None
    megapixels = image.width * image.height / 1e6
    if megapixels > max_megapixels:
        raise ImageLoadError(
            f"too large: {image.width}x{image.height} is {megapixels:.0f} megapixels, "
            f"over MAX_IMAGE_MEGAPIXELS={max_megapixels:g}"
        )
    if image.width < 1 or image.height < 1:
        raise ImageLoadError("image has no pixels")
    return image


def _source_size(source: ImageSource) -> int:
    if isinstance(source, bytes):
        return len(source)
    if isinstance(source, Path | str):
        return os.path.getsize(source)
    return os.fstat(source.fileno()).st_size


def is_own_thumbnail(image: Image.Image, size: int, file_bytes: int) -> bool:
    """Whether a file, opened as `image`, can be sent as its own thumbnail at `size`: a JPEG no larger
    than the thumbnail, in RGB or grey, with no metadata block (nothing to turn upright or to leak) and
    no more than `OWN_THUMBNAIL_BYTES_PER_PIXEL` bytes a pixel plus `OWN_THUMBNAIL_HEADER_BYTES`.
    Sending it costs a read, where making it again costs a decode and an encode and loses quality."""
    width, height = image.size
    return (
        image.format == "JPEG"
        and max(width, height) <= size
        and image.mode in ("RGB", "L")
        and not METADATA_BLOCKS.intersection(image.info)
        and file_bytes <= OWN_THUMBNAIL_BYTES_PER_PIXEL * width * height + OWN_THUMBNAIL_HEADER_BYTES
    )


def _source_bytes(source: ImageSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, Path | str):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


def _photo_formats() -> list[str]:
    Image.init()
    return [name for name in PHOTO_FORMATS if name in Image.OPEN]


def decode_for_model(
    source: ImageSource, min_side: int, max_megapixels: float
) -> tuple[Image.Image, ImageFacts]:
    """The image as RGB, upright (EXIF orientation applied), JPEGs drafted down to >= `min_side`.

    The returned facts are the file's own size and format, not the drafted size.
    """
    image = open_image(source, max_megapixels)
    facts, orientation = image_facts(image)
    with _decoding():
        if image.format in ("JPEG", "MPO"):
            _draft(image, DRAFT_MARGIN * min_side)
        with DECODE_BUDGET.reserve(decode_bytes(image)):
            image.load()
            return _reduced(_model_view(to_rgb(upright(image, orientation))), 2 * min_side), facts


def image_facts(image: Image.Image) -> tuple[ImageFacts, int]:
    """The facts of an opened image (its upright size) and its EXIF orientation, without decoding it."""
    exif = _exif_or_none(image)
    orientation = exif_orientation(exif)
    width, height = image.size
    upright_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return ImageFacts(*upright_size, image.format or "unknown", exif), orientation


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Errors while decoding pixels become `ImageLoadError`: Pillow raises many kinds on hostile data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(f"corrupt or truncated image data ({error})") from None


def _exif_or_none(image: Image.Image) -> Image.Exif | None:
    """The EXIF block as read from the file (before any rotation), its sub-blocks read now while the
    file is open; None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exif = image.getexif()
            for block in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                exif.get_ifd(block)
        return exif
    except Exception as error:  # a malformed EXIF block never stops decoding
        log.debug("unreadable EXIF block: %s", error)
        return None


def exif_orientation(exif: Image.Exif | None) -> int:
    """The EXIF orientation (1 to 8); 1 when there is none or the EXIF data is malformed."""
    try:
        orientation = exif.get(0x0112, 1) if exif is not None else 1
    except Exception:  # malformed EXIF only loses the orientation, never the picture
        return 1
    return orientation if orientation in UPRIGHT else 1


def upright(image: Image.Image, orientation: int) -> Image.Image:
    method = UPRIGHT.get(orientation)
    return image if method is None else image.transpose(method)


def _model_view(image: Image.Image) -> Image.Image:
    """The centre of a very elongated image, with a margin: all that the model's centre crop sees.

    Without it, scaling the short side of a 10000x3 strip up to the model's input would allocate gigabytes.
    """
    short, long = min(image.size), max(image.size)
    keep = 2 * short + 8
    if long <= MAX_ASPECT_RATIO * short or long <= keep:
        return image
    start = (long - keep) // 2
    box = (start, 0, start + keep, short) if image.width > image.height else (0, start, short, start + keep)
    return image.crop(box)


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """The image shrunk by a whole factor (box filter) while its short side stays >= `min_side`.

    The model's own resize then starts from a few times its input size, as after a JPEG draft decode, and
    the full-size pixels are freed before the decode's memory budget is given back.
    """
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 else image


def _draft(image: Image.Image, min_side: int) -> None:
    short = min(image.width, image.height)
    if short <= min_side:
        return
    scale = min_side / short
    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels: transparency over white, 16-bit and float images scaled down to 8 bits."""
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8_bits(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit and float pixels as 8-bit grey (scaled from 16 bits when the peak says so), a band of rows
    at a time, so that the conversion needs no more than a band's worth of extra memory."""
    peak = image.getextrema()[1]
    scale = 255.0 / 65535.0 if peak > 255 else 1.0
    grey = Image.new("L", image.size)
    for top in range(0, image.height, _BAND_ROWS):
        band = image.crop((0, top, image.width, min(top + _BAND_ROWS, image.height)))
        pixels = np.asarray(band, dtype=np.float32) * np.float32(scale)
        np.clip(pixels, 0, 255, out=pixels)
        grey.paste(Image.fromarray(pixels.astype(np.uint8), "L"), (0, top))
    return grey


def thumbnail_jpeg(source: ImageSource, size: int, max_megapixels: float, quality: int = 85) -> bytes:
    """A JPEG whose long side is at most `size`, upright: the file itself where it already is one
    (`is_own_thumbnail`), else the image made smaller and encoded again."""
    image = open_image(source, max_megapixels)
    if is_own_thumbnail(image, size, _source_size(source)):
        return _source_bytes(source)
    orientation = exif_orientation(_exif_or_none(image))
    with _decoding():
        if image.format in ("JPEG", "MPO"):  # DCT-scaled while the long side stays >= size
            _draft(image, math.ceil(size * min(image.size) / max(image.size)))
        with DECODE_BUDGET.reserve(decode_bytes(image)):
            image.load()
            image = to_rgb(upright(image, orientation))
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True, comment=b"")  # no COM copied over
        return out.getvalue()
