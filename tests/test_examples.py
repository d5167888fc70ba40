"""Every examples/*.attn against the float64 materialized oracle, at shapes that stress the tiling."""
from __future__ import annotations

import zlib

import pytest
import torch

import attnc

try:
    from helpers import EXAMPLE_IDS, EXAMPLES, check_against_oracle, example, qkv, random_params
except ImportError:                                     # tests/ imported as a package
    from tests.helpers import EXAMPLE_IDS, EXAMPLES, check_against_oracle, example, qkv, random_params

# (B, H, HKV, Q, KV, D, Dv): names say what each one is for
SHAPES = {
    "ragged": (1, 2, 2, 300, 557, 16, 16),          # neither length a multiple of a block; several tiles
    "cross_gqa_dv": (2, 4, 2, 37, 91, 16, 24),      # Q != KV, B > 1, GQA 4/2, Dv != D
    "mqa": (1, 4, 1, 64, 40, 32, 32),               # one kv head for four query heads, Q > KV
    "decode": (2, 4, 2, 1, 129, 16, 16),            # one query against a cache
    "self_long": (1, 2, 1, 531, 531, 8, 8),         # self-attention across query and key tiles
}
BF16 = ["causal", "alibi", "softcap", "sigmoid", "relu2", "sinks", "document", "sliding_window", "hinge"]


def test_the_examples_are_there():
    assert len(EXAMPLES) >= 20
    assert {"causal", "alibi", "document", "sigmoid", "hinge", "t5_bias"} <= set(EXAMPLE_IDS)


@pytest.fixture(scope="module")
def compiled():
    cache: dict[str, attnc.Compiled] = {}

    def get(name: str) -> attnc.Compiled:
        if name not in cache:
            cache[name] = attnc.compile(example(name))
        return cache[name]
    return get


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_example_fp32_matches_the_oracle(compiled, name, shape):
    attn = compiled(name)
    B, H, HKV, Q, KV, D, Dv = SHAPES[shape]
    q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, torch.float32, seed=zlib.crc32(f"{name}/{shape}".encode()) % 1000)
    params = random_params(attn, B, H, HKV, Q, KV, D, seed=1)
    check_against_oracle(attn, q, k, v, params)


@pytest.mark.parametrize("name", BF16)
def test_example_bf16_matches_the_oracle(compiled, name):
    attn = compiled(name)
    B, H, HKV, Q, KV, D, Dv = SHAPES["cross_gqa_dv"]
    q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, torch.bfloat16, seed=3)
    params = random_params(attn, B, H, HKV, Q, KV, D, seed=2)
    check_against_oracle(attn, q, k, v, params, floor=2e-2)


@pytest.mark.parametrize("name", ["causal", "t5_bias", "hinge"])
def test_example_bf16_across_tiles(compiled, name):
    attn = compiled(name)
    B, H, HKV, Q, KV, D, Dv = SHAPES["self_long"]
    q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, torch.bfloat16, seed=4)
    check_against_oracle(attn, q, k, v, random_params(attn, B, H, HKV, Q, KV, D), floor=2e-2)


INLINE_NORMS = ["linear", "relu", "map(tanh(score))", "sigmoid", "softmax(sink = 0)", "rownorm(abs(score))",
                "rownorm(relu(score) ** 2)", "exp(score - rowmax(score)) / rowsum(exp(score - rowmax(score)))"]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "causal"])
@pytest.mark.parametrize("norm", INLINE_NORMS)
def test_inline_normalizers_match_the_oracle(norm, masked):
    attn = attnc.compile(f"variant n\n{'mask = q_idx >= kv_idx' if masked else ''}\nnorm = {norm}\n")
    for shape in ("ragged", "cross_gqa_dv"):
        B, H, HKV, Q, KV, D, Dv = SHAPES[shape]
        q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, seed=11)
        check_against_oracle(attn, q, k, v, {})


def test_example_scale_is_passed_through(compiled):
    attn = compiled("alibi")
    q, k, v = qkv(1, 2, 2, 50, 70, 16)
    check_against_oracle(attn, q, k, v, random_params(attn, 1, 2, 2, 50, 70, 16), scale=0.7)


# -- rows with nothing kept: output 0, lse -inf, never NaN --

NORMS = ["softmax", "sigmoid", "rownorm(softplus(score))", "rownorm(relu(score) ** 2)", "softmax(sink = 0.5)",
         "relu(score - rowmax(score) + 4) / rowsum(relu(score - rowmax(score) + 4))"]


def _empty_rows(attn, q, k, v, params, rows):
    out, lse = attn(q, k, v, return_lse=True, **params)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = (slice(None),) * 2 + (rows,) if not isinstance(rows, tuple) else rows
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[empty]).all()
    check_against_oracle(attn, q, k, v, params)
    return out, lse


@pytest.mark.parametrize("norm", NORMS)
def test_every_row_masked_gives_zero_and_lse_minus_inf(norm):
    attn = attnc.compile(f"variant nothing\nmask = kv_idx > q_idx + KV\nnorm = {norm}\n")
    q, k, v = qkv(2, 4, 2, 37, 41, 8)
    out, lse = _empty_rows(attn, q, k, v, {}, slice(None))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("norm", NORMS)
def test_leading_rows_masked_give_zero_and_the_rest_match(norm):
    attn = attnc.compile(f"variant late\nmask = kv_idx <= q_idx - 3\nnorm = {norm}\n")
    q, k, v = qkv(1, 2, 2, 300, 600, 8)          # several key tiles, the empty rows in the first query tile
    out, lse = _empty_rows(attn, q, k, v, {}, slice(0, 3))
    assert torch.isfinite(lse[:, :, 3:]).all()


def test_moa_with_zero_width_heads_gives_zero_rows():
    attn = attnc.compile(example("moa"))
    q, k, v = qkv(2, 4, 2, 45, 45, 16)
    widths = torch.tensor([0, 3, 0, 70], dtype=torch.int32)
    out, lse = _empty_rows(attn, q, k, v, {"widths": widths}, (slice(None), [0, 2]))
    assert torch.isfinite(lse[:, [1, 3]]).all()


def test_document_rows_without_a_key_of_their_document():
    # more queries than keys: the first Q - KV queries sit before every key, so causality leaves them nothing
    attn = attnc.compile(example("document"))
    doc = torch.tensor([0] * 20 + [1] * 20, dtype=torch.int32)          # one id per key position
    q, k, v = qkv(1, 2, 2, 60, 40, 8)
    out, lse = _empty_rows(attn, q, k, v, {"doc": doc}, slice(0, 20))
    assert torch.isfinite(lse[:, :, 20:]).all()
