"""Reading and decoding images for the model while it runs, sized to the machine.

Each file is read once: its bytes are hashed, and decoded from memory only when the hash is not one
the index already holds (a move, a duplicate or an untouched file needs no model). Decoding and
preprocessing run either on threads of this process (few cores: the model keeps them) or in worker
processes of a torch DataLoader (many cores, or a GPU doing the model's work), where no GIL and no
intra-op thread pool are shared with the model. `plan_loaders` states the rule; settings override it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from device_decode import IMAGE_DECODES, DeviceDecoder, DeviceJpeg, device_jpeg
from errors import ImageLoadError, IndexingRefused
from image_io import ImageFacts, decode_for_model, file_hash, open_inside, set_decode_memory
from photo_metadata import PHOTO_METADATA_VERSION, photo_fields

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)

# Images per model batch when BATCH_SIZE is 0, by device: a GPU needs large batches to be kept busy.
AUTO_BATCH_SIZE = {"cuda": 256, "mps": 64}
CPU_BATCH_SIZE = 32
# Worker processes pay off from this many spare cores; below it, loader threads share the model's.
MIN_PROCESSES = 2
# Files up to this size are read whole, hashed and decoded from memory; larger ones are read twice.
WHOLE_FILE_MAX_BYTES = 64 << 20
# Decoded batches waiting for the model, per loader thread pool or per worker process.
BATCHES_AHEAD = 2


@dataclass(frozen=True)
class LoaderPlan:
    batch_size: int
    processes: int
    threads: int
    pin_memory: bool
    overlap_writes: bool = True


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def plan_loaders(
    settings: Settings, device: str, cores: int | None = None, model_threads: int = 0
) -> LoaderPlan:
    """Batch size and loaders for `device` on `cores` cores.

    On a GPU the model needs one core to feed it, and every other core gets a worker process. On the
    CPU the model keeps its torch threads (TORCH_THREADS, else one per core) and the loaders use what
    is left: worker processes from MIN_PROCESSES spare cores, else LOADER_THREADS threads. Store
    writes overlap the model where it leaves a core free: on a CPU it fully uses, a write beside it
    stalls every torch thread at its next barrier and costs more than it saves (bench/RESULTS.md).
    """
    if settings.BATCH_SIZE < 0:
        raise IndexingRefused(f"BATCH_SIZE must be 0 (chosen by device) or more, not {settings.BATCH_SIZE}")
    if settings.LOADER_THREADS < 1:
        raise IndexingRefused(f"LOADER_THREADS must be 1 or more, not {settings.LOADER_THREADS}")
    if settings.IMAGE_DECODE not in IMAGE_DECODES:
        raise IndexingRefused(
            f"IMAGE_DECODE must be one of {', '.join(IMAGE_DECODES)}, not {settings.IMAGE_DECODE!r}"
        )
    if settings.LOADER_PROCESSES < -1:
        raise IndexingRefused(
            "LOADER_PROCESSES must be -1 (chosen by cores), 0 (threads) or more, "
            f"not {settings.LOADER_PROCESSES}"
        )
    kind = torch.device(device).type  # "cuda:1" is a CUDA device too
    cores = cores or available_cores()
    model_cores = 1 if kind != "cpu" else model_threads or torch.get_num_threads()
    spare = cores - model_cores
    processes = settings.LOADER_PROCESSES
    if processes == -1:
        processes = spare if spare >= MIN_PROCESSES else 0
    batch_size = settings.BATCH_SIZE or AUTO_BATCH_SIZE.get(kind, CPU_BATCH_SIZE)
    return LoaderPlan(batch_size, processes, settings.LOADER_THREADS, kind == "cuda", spare >= 1)


@dataclass
class Loaded:
    """One file as read: its content hash, and unless the hash was known, its pixels and facts."""

    content_hash: str = ""
    pixels: torch.Tensor | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    decoded: bool = False
    jpeg: DeviceJpeg | None = None  # instead of pixels: to be decoded on the model's device


@dataclass
class LoadedBatch:
    """The files of one batch in order; `pixels` stacks those that were decoded, in the same order."""

    pixels: torch.Tensor | None
    files: list[Loaded]

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader's pinning thread, so that the copy to the GPU can run asynchronously."""
        return LoadedBatch(self.pixels.pin_memory() if self.pixels is not None else None, self.files)


class KnownHashes:
    """Content hashes the index holds, as sorted 64-bit prefixes: small to send to worker processes.

    A match only means "probably known"; the indexer checks the whole hash.
    """

    def __init__(self, hashes: list[str]) -> None:
        self.prefixes = np.unique(np.array([int(value[:16], 16) for value in hashes], dtype=np.uint64))

    def __contains__(self, content_hash: str) -> bool:
        prefix = np.uint64(int(content_hash[:16], 16))
        index = int(np.searchsorted(self.prefixes, prefix))
        return index < len(self.prefixes) and self.prefixes[index] == prefix


@dataclass(frozen=True)
class LoadJob:
    path: str  # relative to the loader's root
    own_hash: str = ""  # a stored file's hash: equal means unchanged; empty for a new file


class FileLoader(Dataset):
    """Reads, hashes, decodes and preprocesses the files of `jobs`; picklable for worker processes."""

    def __init__(
        self,
        root: Path,
        jobs: list[LoadJob],
        known: KnownHashes,
        resolution: int,
        max_megapixels: float,
        preprocess: Callable[[Any], torch.Tensor],
        device_jpegs: bool = False,
    ) -> None:
        self.root = root
        self.device_jpegs = device_jpegs
        self.jobs = jobs
        self.known = known
        self.resolution = resolution
        self.max_megapixels = max_megapixels
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> Loaded:
        job = self.jobs[index]
        try:
            file, opened = open_inside(self.root, job.path)
        except OSError as error:
            return Loaded(error=f"cannot read: {error.strerror or error}")
        with file:
            try:
                data = file.read() if opened.st_size <= WHOLE_FILE_MAX_BYTES else None
                content_hash = hashlib.sha256(data).hexdigest() if data is not None else file_hash(file)
            except OSError as error:
                return Loaded(error=f"cannot read: {error.strerror or error}")
            if content_hash == job.own_hash or (not job.own_hash and content_hash in self.known):
                return Loaded(content_hash)
            if data is None:
                file.seek(0)
            return self._decoded(content_hash, data if data is not None else file)

    def _decoded(self, content_hash: str, source: bytes | BinaryIO) -> Loaded:
        handed = (
            device_jpeg(source, self.max_megapixels)
            if self.device_jpegs and isinstance(source, bytes)
            else None
        )
        if handed is not None:
            return Loaded(content_hash, jpeg=handed[0], facts=_described(handed[1]), decoded=True)
        try:
            image, facts = decode_for_model(source, self.resolution, self.max_megapixels)
            pixels = self.preprocess(image)
        except ImageLoadError as error:
            return Loaded(content_hash, error=str(error))
        except Exception as error:  # one bad file never stops the run
            return Loaded(content_hash, error=f"cannot decode: {error}")
        return Loaded(content_hash, pixels, _described(facts), decoded=True)


def _described(facts: ImageFacts) -> dict[str, Any]:
    photo = photo_fields(facts.exif) if facts.exif is not None else {}
    return {
        "width": facts.width,
        "height": facts.height,
        "format": facts.format,
        "photo_metadata": PHOTO_METADATA_VERSION,
        **photo,
    }


def collate(files: list[Loaded]) -> LoadedBatch:
    """Stack the decoded pixels (in a worker, `default_collate` puts them in shared memory)."""
    decoded = [file.pixels for file in files if file.pixels is not None]
    for file in files:
        file.pixels = None
    return LoadedBatch(default_collate(decoded) if decoded else None, files)


def with_device_pixels(batch: LoadedBatch, decoder: DeviceDecoder) -> LoadedBatch:
    """The batch with its JPEGs decoded on the device, stacked in order with the CPU-decoded pixels."""
    handed = [file for file in batch.files if file.jpeg is not None]
    if not handed:
        return batch
    from_device = iter(decoder.pixels([file.jpeg for file in handed]))
    from_cpu = iter(batch.pixels.to(decoder.device) if batch.pixels is not None else [])
    stacked = []
    for file in batch.files:
        if file.jpeg is None:
            if file.decoded:
                stacked.append(next(from_cpu))
            continue
        file.jpeg, result = None, next(from_device)
        if isinstance(result, str):
            file.error, file.decoded = result, False
        else:
            stacked.append(result)
    return LoadedBatch(torch.stack(stacked) if stacked else None, batch.files)


def loaded_batches(loader: FileLoader, plan: LoaderPlan, decode_memory_mb: float) -> Iterator[LoadedBatch]:
    """The files of `loader` in batches, in order, decoded ahead of the model."""
    processes = min(plan.processes, math.ceil(len(loader) / plan.batch_size))
    if processes >= MIN_PROCESSES:
        log.info("decoding on %d worker processes, %d images per batch", processes, plan.batch_size)
        yield from _from_processes(loader, plan, processes, decode_memory_mb)
    else:
        log.info("decoding on %d threads, %d images per batch", plan.threads, plan.batch_size)
        yield from _from_threads(loader, plan)


def _from_threads(loader: FileLoader, plan: LoaderPlan) -> Iterator[LoadedBatch]:
    starts = iter(range(0, len(loader), plan.batch_size))
    with ThreadPoolExecutor(plan.threads, thread_name_prefix="loader") as pool:
        pending: deque[list[Future[Loaded]]] = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                end = min(start + plan.batch_size, len(loader))
                pending.append([pool.submit(loader.__getitem__, index) for index in range(start, end)])

        for _ in range(BATCHES_AHEAD):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield collate([future.result() for future in futures])


def _from_processes(
    loader: FileLoader, plan: LoaderPlan, processes: int, decode_memory_mb: float
) -> Iterator[LoadedBatch]:
    batches = DataLoader(
        loader,
        batch_size=plan.batch_size,
        num_workers=processes,
        collate_fn=collate,
        pin_memory=plan.pin_memory,
        prefetch_factor=BATCHES_AHEAD,
        worker_init_fn=functools.partial(_start_worker, decode_memory_mb / processes),
        # A fresh server process forks the workers: forking this one, with Chroma's and torch's
        # threads running, could deadlock a child.
        multiprocessing_context="forkserver",
    )
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:  # a worker died (killed for memory, for example)
            raise IndexingRefused(
                f"an image loader process failed ({error}); what was encoded so far is kept. "
                "Set LOADER_PROCESSES=0 to decode on threads instead"
            ) from error
        yield batch


def _start_worker(decode_memory_mb: float, worker_id: int) -> None:
    """Each worker process gets its share of DECODE_MEMORY_MB (torch already gives it one thread)."""
    set_decode_memory(decode_memory_mb)
