"""Which device `DEVICE=auto` picks (CUDA, then Apple's mps, then the CPU) and TORCH_THREADS."""

from __future__ import annotations

import pytest
import torch

from clip_encoder import ClipEncoder, resolve_device
from config import Settings
from errors import ModelLoadError


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_torch_threads_sets_torch_s_cpu_threads_and_refuses_a_negative_count(tiny_checkpoint):
    before = torch.get_num_threads()
    settings = Settings(MODEL_NAME=str(tiny_checkpoint), DEVICE="cpu")
    try:
        ClipEncoder.from_settings(settings.with_overrides(TORCH_THREADS=1))
        assert torch.get_num_threads() == 1
        ClipEncoder.from_settings(settings)  # 0: torch's default is left as it is
        assert torch.get_num_threads() == 1
        with pytest.raises(ModelLoadError, match="TORCH_THREADS"):
            ClipEncoder.from_settings(settings.with_overrides(TORCH_THREADS=-2))
    finally:
        torch.set_num_threads(before)
