"""Normalizers at their edges, on both backends: constant weights, weights that do not read the score, a
sum that grows with the row max (two passes), a constant that is not a number (refused)."""
from __future__ import annotations

import pytest
import torch

import attnc

try:
    from helpers import check_against_oracle, generator
except ImportError:
    from tests.helpers import check_against_oracle, generator

SPECS = {
    "constant_one": "variant c\nnorm = 1\n",
    "constant_score": "variant c\nscore = 0\nnorm = sign(score) * abs(score)\n",
    "nothing_kept": "variant c\nmask = false\nnorm = sigmoid\n",
    "constant_map": "variant c\nmask = q_idx >= kv_idx\nnorm = map(0.5)\n",
    # exp(s + rowmax): a running max would rescale by exp(+inf) while nothing is kept yet; two passes instead
    "grows_with_max": "variant c\nnorm = exp(score - rowmax(score)) / rowsum(exp(score + rowmax(score)))\n",
    # no row max subtracted: weights of order e^-100 are tiny, not zero
    "no_row_max": "variant c\nscore = score * 4 - 100\nnorm = exp(score) / rowsum(exp(score))\n",
    # the weights are the score c * x itself: the constant factor must reach them
    "plain_linear": "variant c\nmask = q_idx >= kv_idx\nnorm = linear\n",     # the weights are the logit itself
    "scaled_linear": "variant c\nmask = q_idx >= kv_idx\nscore = 0.5 * score\nnorm = linear\n",
    "scaled_index": "variant c\nmask = kv_idx < 30\nscore = 0.1 * q_idx\nnorm = linear\n",
}


def backends():
    out = ["torch"]
    try:
        import triton  # noqa: F401
        from attnc.backends.triton_launch import interpreting
        if interpreting() or torch.cuda.is_available():
            out.append("triton")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", list(SPECS))
def test_edge_normalizers_match_the_oracle(name, backend):
    attn = attnc.compile(SPECS[name], backend=backend)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=generator(i)) for i in range(3))
    check_against_oracle(attn, q, k, v, {})


def test_a_sum_that_grows_with_the_max_takes_two_passes_and_says_why():
    attn = attnc.compile(SPECS["grows_with_max"])
    text = attn.ir()
    assert "2 passes over the keys" in text and "grows with" in text


@pytest.mark.parametrize("spec", ["variant c\nnorm = inf\n", "variant c\nnorm = -inf\n"])
def test_a_weight_that_is_not_a_number_is_refused(spec):
    with pytest.raises(attnc.SpecError, match="normalizer is the constant"):
        attnc.compile(spec).source()
