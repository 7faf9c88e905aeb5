"""Shared fixtures. CPU only, no network: the hub is switched off before anything imports it."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests' models are tiny: one intra-op thread is faster than two (no fork/join per small op) and immune to the
# oversubscription that makes two threads pathologically slow when the two cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def make_tiny():
    """Factory of fresh tiny SD-shaped components (random weights, fp32, CPU); call with seed=..., image_size=..."""
    from common.models import tiny_components

    return tiny_components


@pytest.fixture
def tiny(make_tiny):
    """Fresh tiny components (tests may add adapters to them)."""
    return make_tiny(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
