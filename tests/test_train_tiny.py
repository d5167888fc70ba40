"""examples/train_tiny.py, short: a tiny causal transformer trains through attnc's derived backward. With
causal softmax its loss curve is SDPA's to float32 rounding; a sigmoid-normalized variant learns too."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_causal_softmax_trains_like_sdpa(train_tiny):
    sdpa = train_tiny.train("sdpa", steps=25)
    ours = train_tiny.train("attnc-causal", steps=25)
    assert sdpa[-1] < 0.75 * sdpa[0]                    # the model learns at all
    assert max(abs(a - b) for a, b in zip(sdpa, ours)) < 1e-4


def test_a_sigmoid_normalized_variant_trains(train_tiny):
    losses = train_tiny.train("attnc-sigmoid", steps=25)
    assert all(x == x for x in losses)                  # no NaN anywhere
    assert min(losses[-5:]) < 0.75 * losses[0]
