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
RUNTIMES = ("torch", "onnx")
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
        self,
        name: str,
        device: str = "auto",
        image_runtime: str = "torch",
        onnx_cache: str = "",
        text_runtime: str = "torch",
    ) -> None:
        if name not in clip.available_models() and not os.path.isfile(name):
            raise ModelLoadError(
                f"unknown model {name!r}: use one of {', '.join(clip.available_models())} "
                "or the path of a CLIP checkpoint file"
            )
        check_runtime("IMAGE_RUNTIME", image_runtime)
        check_runtime("TEXT_RUNTIME", text_runtime)
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
        self._text_tower = TextTower(self.model)
        self._onnx = self._onnx_visual(onnx_cache) if image_runtime == "onnx" else None
        self._onnx_text = self._onnx_text_tower(onnx_cache) if text_runtime == "onnx" else None
        log.info(
            "loaded CLIP %s on %s (%d-d vectors, images by %s, texts by %s)",
            name,
            self.device,
            self.dim,
            image_runtime,
            text_runtime,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ClipEncoder:
        set_torch_threads(settings.TORCH_THREADS)
        return cls(
            settings.MODEL_NAME,
            settings.DEVICE,
            settings.IMAGE_RUNTIME,
            settings.ONNX_CACHE_FOLDER,
            settings.TEXT_RUNTIME,
        )

    def _onnx_visual(self, cache_folder: str) -> OnnxTower:
        pixels = torch.zeros(1, 3, self.input_resolution, self.input_resolution)
        path = self._onnx_path("IMAGE", cache_folder, "visual")
        return OnnxTower(self.model.visual, path, "pixels", pixels, {0: "batch"})

    def _onnx_text_tower(self, cache_folder: str) -> OnnxTower:
        tokens = torch.zeros(1, 2, dtype=torch.long)
        path = self._onnx_path("TEXT", cache_folder, "text")
        return OnnxTower(self._text_tower, path, "tokens", tokens, {0: "batch", 1: "length"})

    def _onnx_path(self, setting: str, cache_folder: str, tower: str) -> Path:
        if self.device != "cpu":
            raise ModelLoadError(
                f"{setting}_RUNTIME=onnx runs on the CPU: set DEVICE=cpu, or use torch on the GPU"
            )
        file_name = self.identity.replace("/", "-").replace("#", "-") + f"-{tower}.onnx"
        return Path(cache_folder).expanduser() / file_name

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Vectors of a batch of preprocessed images (N x 3 x R x R)."""
        if self._onnx is not None:
            return _normalised(self._onnx.encode(pixels.float()))
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
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        if self._onnx_text is not None:
            return _normalised(self._onnx_text.encode(tokens))
        return _normalised(self._text_tower(tokens))


class TextTower(torch.nn.Module):
    """CLIP's text tower (`encode_text`) over tokens cut after the longest text's end token: the same
    vectors, since a causal mask keeps later tokens out of the end token's, in a fraction of the time.
    The attention is written out from the module's weights, so that an ONNX export keeps the text's
    length a free dimension (torch's attention module bakes the traced length into its reshapes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        count, length = tokens.shape
        x = model.token_embedding(tokens) + model.positional_embedding[:length]
        mask = _causal_mask(length, x.device, x.dtype)
        for block in model.transformer.resblocks:
            x = x + _attention_by_hand(block.attn, block.ln_1(x), mask)
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_final(x)
        return x[torch.arange(count), tokens.argmax(dim=-1)] @ model.text_projection


def _attention_by_hand(
    attention: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`attention(x, x, x, attn_mask=mask)` for batch-first `x`, from the module's own weights."""
    count, length, _ = x.shape
    projected = torch.nn.functional.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    query, key, value = (
        part.reshape(count, length, attention.num_heads, -1).transpose(1, 2)
        for part in projected.chunk(3, dim=-1)
    )
    attended = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return attention.out_proj(attended.transpose(1, 2).reshape(count, length, -1))


class OnnxTower:
    """One of CLIP's towers exported to ONNX once (cached per model) and run by ONNX Runtime: the image
    tower, or the text tower without torch's cost per operation, which dominates at a few tokens."""

    def __init__(
        self, tower: torch.nn.Module, path: Path, name: str, example: torch.Tensor, free: dict[int, str]
    ) -> None:
        import onnxruntime

        if not path.is_file():
            _export(tower, path, name, example, free)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = name

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.session.run(None, {self.name: inputs.numpy()})[0]
        return torch.from_numpy(features)


def _export(
    tower: torch.nn.Module, path: Path, name: str, example: torch.Tensor, free: dict[int, str]
) -> None:
    """Export `tower` (one input, `name`, shaped like `example` but for its dimensions `free`) to a
    temporary file beside `path`, then rename: a crash never leaves half a model."""
    log.info("exporting a CLIP encoder to ONNX: %s (once per model)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        partial = Path(folder) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                tower,
                (example,),
                str(partial),
                input_names=[name],
                output_names=["features"],
                dynamic_axes={name: free, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(partial, path)


def check_runtime(setting: str, runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"{setting} must be one of {', '.join(RUNTIMES)}, not {runtime!r}")


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32)


@functools.cache
def _text_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-encoding")
