"""Shared fixtures. Tests run offline: the default model comes from ../shared/models when it exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if SHARED_MODELS.is_dir():
    os.environ.setdefault("PLIPY_MODELS", str(SHARED_MODELS))


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per test session."""
    import torch

    from plipy.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", dtype="float32", device="cpu")
