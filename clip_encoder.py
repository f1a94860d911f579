"""OpenAI CLIP, loaded once, turning images and texts into L2-normalised float32 vectors."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from threadpoolctl import ThreadpoolController

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the clip package imports the deprecated pkg_resources
    import clip

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model name or checkpoint cannot be loaded."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_identity(name: str) -> str:
    """What a collection records as its model: the CLIP name, or a checkpoint's name and content hash."""
    if name in clip.available_models():
        return name
    digest = hashlib.sha256()
    with open(name, "rb") as checkpoint:
        for block in iter(lambda: checkpoint.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(name)}#{digest.hexdigest()[:16]}"


def keep_numpy_blas_single_threaded() -> None:
    """Stop numpy's OpenBLAS threads from spinning after each small product and starving the model.

    The engine's numpy work is small (scores of a few hundred vectors); measured at 100k images, the
    spinning threads made the next text encoding four times slower (bench/RESULTS.md, query latency).
    """
    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


class ClipEncoder:
    """A CLIP model with its preprocessing; safe to call from several threads at once."""

    def __init__(self, name: str, device: str = "auto") -> None:
        if name not in clip.available_models() and not os.path.isfile(name):
            raise ModelLoadError(
                f"unknown model {name!r}: use one of {', '.join(clip.available_models())} "
                "or the path of a CLIP checkpoint file"
            )
        self.name = name
        self.device = resolve_device(device)
        try:
            self.model, self.preprocess = clip.load(name, device=self.device, jit=False)
        except Exception as error:
            raise ModelLoadError(f"cannot load model {name!r}: {error}") from error
        self.model.eval()
        keep_numpy_blas_single_threaded()
        self.identity = model_identity(name)
        self.dim = int(self.model.text_projection.shape[1])
        self.input_resolution = int(self.model.visual.input_resolution)
        log.info("loaded CLIP %s on %s (%d-d vectors)", name, self.device, self.dim)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Vectors of a batch of preprocessed images (N x 3 x R x R)."""
        features = self.model.encode_image(pixels.to(self.device, self.model.dtype))
        return _normalised(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_pixels(torch.stack([self.preprocess_image(image) for image in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text vectors, computed only up to the longest text's end token (the same result, faster)."""
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


def _attend(block: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return block.attn(x, x, x, need_weights=False, attn_mask=mask)[0]


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32)
