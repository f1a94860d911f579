"""OpenAI CLIP, loaded once, turning images and texts into L2-normalised float32 vectors."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from threadpoolctl import ThreadpoolController

from errors import ModelLoadError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the clip package imports the deprecated pkg_resources
    import clip

# clip.load tries torch.jit.load on every checkpoint before torch.load, and torch marks torch.jit.load
# deprecated: a note about clip's code, printed at every start, that no user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)
IMAGE_RUNTIMES = ("torch", "onnx")
# Where clip.load keeps the weights of a named model once downloaded (clip's own default).
CLIP_CACHE_FOLDER = Path("~/.cache/clip").expanduser()


def resolve_device(device: str) -> str:
    """`auto`: CUDA where torch finds it, else Apple's Metal (`mps`), else the CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def set_torch_threads(threads: int) -> None:
    """TORCH_THREADS: torch's CPU threads, process-wide (0 keeps torch's default)."""
    if threads < 0:
        raise ModelLoadError(f"TORCH_THREADS must be 0 (torch's default) or a thread count, not {threads}")
    if threads:
        torch.set_num_threads(threads)


def model_identity(name: str) -> str:
    """What a collection records as its model: the CLIP name, or a checkpoint's name and content hash."""
    if name in clip.available_models():
        return name
    digest = hashlib.sha256()
    with open(name, "rb") as checkpoint:
        for block in iter(lambda: checkpoint.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(name)}#{digest.hexdigest()[:16]}"


def load_failure_message(name: str, error: Exception) -> str:
    """What went wrong loading `name`, in words that say what to do; a failed download is told as such."""
    if name in clip.available_models() and isinstance(error, OSError):
        return (
            f"cannot load model {name!r}: its weights could not be downloaded from the internet ({error}). "
            f"Once downloaded they are cached in {CLIP_CACHE_FOLDER}; without internet access, copy the "
            "checkpoint file there, or set MODEL_NAME (or --model) to the path of a local checkpoint file"
        )
    return f"cannot load model {name!r}: {error}"


def keep_numpy_blas_single_threaded() -> None:
    """Stop numpy's OpenBLAS threads from spinning after each small product and starving the model.

    The engine's numpy work is small (scores of a few hundred vectors); measured at 100k images, the
    spinning threads made the next text encoding four times slower (bench/RESULTS.md, query latency).
    """
    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


class ClipEncoder:
    """A CLIP model with its preprocessing; safe to call from several threads at once."""

    def __init__(
        self, name: str, device: str = "auto", image_runtime: str = "torch", onnx_cache: str = ""
    ) -> None:
        if name not in clip.available_models() and not os.path.isfile(name):
            raise ModelLoadError(
                f"unknown model {name!r}: use one of {', '.join(clip.available_models())} "
                "or the path of a CLIP checkpoint file"
            )
        if image_runtime not in IMAGE_RUNTIMES:
            raise ModelLoadError(
                f"IMAGE_RUNTIME must be one of {', '.join(IMAGE_RUNTIMES)}, not {image_runtime!r}"
            )
        self.name = name
        self.device = resolve_device(device)
        try:
            self.model, self.preprocess = clip.load(
                name, device=self.device, jit=False, download_root=str(CLIP_CACHE_FOLDER)
            )
        except Exception as error:
            raise ModelLoadError(load_failure_message(name, error)) from error
        self.model.eval()
        keep_numpy_blas_single_threaded()
        self.identity = model_identity(name)
        self.dim = int(self.model.text_projection.shape[1])
        self.input_resolution = int(self.model.visual.input_resolution)
        self._onnx = self._onnx_visual(onnx_cache) if image_runtime == "onnx" else None
        log.info(
            "loaded CLIP %s on %s (%d-d vectors, images by %s)", name, self.device, self.dim, image_runtime
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ClipEncoder:
        set_torch_threads(settings.TORCH_THREADS)
        return cls(settings.MODEL_NAME, settings.DEVICE, settings.IMAGE_RUNTIME, settings.ONNX_CACHE_FOLDER)

    def _onnx_visual(self, cache_folder: str) -> OnnxVisual:
        if self.device != "cpu":
            raise ModelLoadError(
                "IMAGE_RUNTIME=onnx runs on the CPU: set DEVICE=cpu, or use torch on the GPU"
            )
        file_name = self.identity.replace("/", "-").replace("#", "-") + "-visual.onnx"
        return OnnxVisual(
            self.model.visual, self.input_resolution, Path(cache_folder).expanduser() / file_name
        )

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Vectors of a batch of preprocessed images (N x 3 x R x R)."""
        if self._onnx is not None:
            return _normalised(self._onnx.encode(pixels))
        on_cuda = self.device.startswith("cuda")
        features = self.model.encode_image(pixels.to(self.device, self.model.dtype, non_blocking=on_cuda))
        return _normalised(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_pixels(torch.stack([self.preprocess_image(image) for image in images]))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text vectors, computed only up to the longest text's end token (the same result, faster).

        On the CPU every text of the process is encoded on one thread (`_text_thread`): OpenMP (torch's
        libgomp) keeps a team of threads per calling thread, and once the teams outnumber the cores
        it stops letting idle threads spin between the encoder's hundreds of small parallel steps,
        so that a server encoding on its several request threads waited each time for sleeping ones.
        """
        if self.device != "cpu":
            return self._encode_texts_here(texts)
        return _text_thread().submit(self._encode_texts_here, texts).result()

    @torch.inference_mode()
    def _encode_texts_here(self, texts: Sequence[str]) -> np.ndarray:
        tokens = clip.tokenize(list(texts), truncate=True).to(self.device)
        length = int(tokens.argmax(dim=-1).max()) + 1
        return _normalised(self._encode_tokens(tokens[:, :length]))

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        length = tokens.shape[1]
        x = model.token_embedding(tokens).type(model.dtype)
        x = x + model.positional_embedding[:length].type(model.dtype)
        mask = _causal_mask(length, x.device, x.dtype)
        x = x.permute(1, 0, 2)
        for block in model.transformer.resblocks:
            x = x + _attend(block, block.ln_1(x), mask)
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
        end_tokens = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        return end_tokens @ model.text_projection


class OnnxVisual:
    """CLIP's image tower exported to ONNX once (cached per model) and run by ONNX Runtime."""

    def __init__(self, visual: torch.nn.Module, resolution: int, path: Path) -> None:
        import onnxruntime

        if not path.is_file():
            _export_visual(visual, resolution, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.session.run(None, {"pixels": pixels.float().numpy()})[0]
        return torch.from_numpy(features)


def _export_visual(visual: torch.nn.Module, resolution: int, path: Path) -> None:
    """Export to a temporary file beside `path`, then rename: a crash never leaves half a model."""
    log.info("exporting the image encoder to ONNX: %s (once per model)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        partial = Path(folder) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                visual,
                (torch.zeros(1, 3, resolution, resolution),),
                str(partial),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(partial, path)


def _attend(block: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return block.attn(x, x, x, need_weights=False, attn_mask=mask)[0]


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32)


@functools.cache
def _text_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-encoding")
