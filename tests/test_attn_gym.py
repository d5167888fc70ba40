"""attention-gym's mask and score mods, unchanged, through attnc.flex_attention.

attention-gym (`pip install --no-deps attn-gym`) is the reference set of real FlexAttention user code. Each
case runs attnc in float64 against the oracle (torch's eager flex_attention in float64, or, for a BlockMask
whose selection lives in its tables, the tables written out block by block, which torch's eager path does
not read) and in float32 against torch's eager float32 run as the peer: attnc's error may be at most twice
the peer's. Every mask also goes through attnc.create_block_mask, which must equal torch's."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tf

import attnc

attn_gym = pytest.importorskip("attn_gym", reason="attention-gym is not installed: pip install --no-deps attn-gym")
from attn_gym.masks import (  # noqa: E402
    batchify_mask_mod, build_tree_ancestor_matrix, causal_mask, create_vsa_block_mask, create_vsa_flash_block_mask,
    generate_block_diffusion_mask, generate_dilated_sliding_window, generate_doc_mask_mod,
    generate_global_sliding_window, generate_jetspec_training_mask_mod, generate_jetspec_tree_causal_mask_mod,
    generate_morton_natten, generate_natten, generate_packed_causal_doc_mask_mod, generate_prefix_lm_mask,
    generate_shared_prefix_mask_mod, generate_sliding_window, generate_spatial_head_mask_mod,
    generate_sta_mask_mod_2d, generate_sta_mask_mod_3d, generate_temporal_head_mask_mod, generate_tiled_natten,
    generate_vsa_mask_mod)
from attn_gym.masks.causal import create_causal_block_mask_fast  # noqa: E402
from attn_gym.masks.document_mask import length_to_offsets  # noqa: E402
from attn_gym.mods import (  # noqa: E402
    generate_activation_score_mod, generate_alibi_bias, generate_graphormer_edge_bias,
    generate_graphormer_spatial_bias, generate_mla_rope_score_mod, generate_sandwich_bias, generate_tanh_softcap,
    shortest_path_distances, shortest_path_edge_types)

try:
    from helpers import generator
except ImportError:
    from tests.helpers import generator

BLOCK = 32


@pytest.fixture(autouse=True)
def quiet_torch(monkeypatch):
    """torch's eager flex_attention as a plain function (its debug path), without warnings."""
    monkeypatch.setattr(tf, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Case:
    """One attention-gym mod at one shape. tables: a BlockMask whose tables select (built by
    attention-gym); peer_mask: the mask_mod that says the same point by point, for torch's eager run."""

    def __init__(self, B=2, H=4, HKV=2, Q=120, KV=None, score_mod=None, mask_mod=None, tables=None,
                 peer_mask=None, tol64=1e-10):
        self.B, self.H, self.HKV, self.Q, self.KV = B, H, HKV, Q, Q if KV is None else KV
        self.score_mod, self.mask_mod, self.tables, self.peer_mask = score_mod, mask_mod, tables, peer_mask
        self.tol64 = tol64


def _offsets(lengths):
    return length_to_offsets(lengths, "cpu")


def _graph(B, N, seed):
    g = generator(seed)
    adjacency = torch.rand(B, N, N, generator=g) < 0.08
    adjacency = adjacency | adjacency.transpose(1, 2)
    return adjacency, torch.randint(0, 5, (B, N, N), generator=g)


def cases() -> dict:
    S = 120
    g = generator(11)
    out = {
        "causal_mask": Case(mask_mod=causal_mask),
        "sliding_window": Case(mask_mod=generate_sliding_window(16)),
        "prefix_lm": Case(mask_mod=generate_prefix_lm_mask(20)),
        "document_causal": Case(mask_mod=generate_doc_mask_mod(causal_mask, _offsets([30, 50, 12, 28]))),
        "document_noop": Case(mask_mod=generate_doc_mask_mod(tf.noop_mask, _offsets([7, 60, 33, 20]))),
        "packed_causal_document": Case(mask_mod=generate_packed_causal_doc_mask_mod(_offsets([40, 1, 45, 34]))),
        "dilated_sliding_window": Case(mask_mod=generate_dilated_sliding_window(8, 2)),
        "natten": Case(mask_mod=generate_natten(canvas_w=12, canvas_h=10, kernel_w=5, kernel_h=3)),
        "tiled_natten": Case(Q=64, mask_mod=generate_tiled_natten(W=8, H=8, K_W=3, K_H=3, T_W=4, T_H=4)),
        "morton_natten": Case(Q=64, mask_mod=generate_morton_natten(8, 8, 3, 3)),
        "global_sliding_window": Case(mask_mod=generate_global_sliding_window(4, torch.rand(S, generator=g) < 0.05)),
        "block_diffusion": Case(Q=96, mask_mod=generate_block_diffusion_mask(48, 8)),
        "batchify_causal": Case(mask_mod=batchify_mask_mod(causal_mask, 16)),
        "flamingo_cross_attention": Case(Q=80, KV=48, mask_mod=attn_gym.masks.generate_vision_cross_attention_mask_mod(
            torch.tensor([[0, 40], [20, 70], [50, 80]]), 16)),
        "jetspec_tree_causal": Case(Q=7, KV=12, mask_mod=generate_jetspec_tree_causal_mask_mod(
            5, build_tree_ancestor_matrix([-1, 0, 1, 1, 3, 3, 0], device="cpu"))),
        "jetspec_training": Case(Q=48, KV=64, mask_mod=generate_jetspec_training_mask_mod(16, 8)),
        "shared_prefix": Case(mask_mod=generate_shared_prefix_mask_mod(
            _offsets([30, 20, 20, 10, 25, 15]), torch.tensor([0, 0, 0, 3, 3, 3]))),
        "sta_2d": Case(Q=72, mask_mod=generate_sta_mask_mod_2d((8, 8), (4, 4), (2, 2), text_seq_len=8)),
        "sta_3d": Case(Q=68, mask_mod=generate_sta_mask_mod_3d((4, 4, 4), (2, 2, 2), (2, 2, 2), text_seq_len=4)),
        "svg_spatial_head": Case(Q=106, mask_mod=generate_spatial_head_mask_mod(10, 4, 24, 1, round_width=8)),
        "svg_temporal_head": Case(Q=106, mask_mod=generate_temporal_head_mask_mod(10, 4, 24, 2)),
        "alibi": Case(score_mod=generate_alibi_bias(4), mask_mod=causal_mask),
        "tanh_softcap": Case(score_mod=generate_tanh_softcap(20)),
        "tanh_softcap_approx": Case(score_mod=generate_tanh_softcap(20, approx=True)),
        "activation_relu": Case(score_mod=generate_activation_score_mod(F.relu)),
        "activation_sigmoid": Case(score_mod=generate_activation_score_mod(torch.sigmoid, offset=0.5)),
        "activation_gelu": Case(score_mod=generate_activation_score_mod()),
        # attention-gym builds the table in float32 and torch multiplies it in float32: agreement to that
        "sandwich": Case(score_mod=generate_sandwich_bias(4, S, d_bar=16), tol64=1e-6),
        "mla_rope": Case(H=4, HKV=4, score_mod=generate_mla_rope_score_mod(
            torch.randn(2, 4, S, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 1, S, 8, generator=g, dtype=torch.float64), 4, scale=0.5)),
    }
    adjacency, edge_types = _graph(2, 50, 3)
    spatial_bias = torch.randn(4, 6, generator=g, dtype=torch.float64)
    out["graphormer_spatial"] = Case(Q=50, score_mod=generate_graphormer_spatial_bias(
        spatial_bias, shortest_path_distances(adjacency, 4)))
    path_types, path_lengths = shortest_path_edge_types(adjacency, edge_types, 3)
    out["graphormer_edge"] = Case(Q=50, score_mod=generate_graphormer_edge_bias(
        torch.randn(4, 3, 5, generator=g, dtype=torch.float64), path_types, path_lengths))
    # data-dependent block selection: attention-gym's VSA masks, as a mask_mod and as tables
    topk = torch.stack([torch.randperm(8, generator=generator(100 + i))[:3] for i in range(2 * 4 * 8)])
    topk = topk.view(2, 4, 8, 3).int()
    sizes = torch.tensor([16, 16, 9, 16, 16, 3, 16, 16])
    out["vsa_mask_mod"] = Case(Q=128, mask_mod=generate_vsa_mask_mod(topk, 16, sizes))
    out["vsa_block_mask"] = Case(Q=128, tables=create_vsa_block_mask(topk, 16, 8),
                                 peer_mask=generate_vsa_mask_mod(topk, 16))
    out["vsa_block_mask_padded"] = Case(Q=128, tables=create_vsa_block_mask(topk, 16, 8, sizes),
                                        peer_mask=generate_vsa_mask_mod(topk, 16, sizes))
    topk32 = _distinct(topk[:, :, :4] % 4, 4)          # 32-token tiles, each split into two 16-key blocks
    sizes32 = torch.tensor([32, 20, 32, 5])
    out["vsa_flash_block_mask"] = Case(Q=128, tables=create_vsa_flash_block_mask(topk32, 32, 4, 16, sizes32),
                                       peer_mask=generate_vsa_mask_mod(topk32, 32, sizes32))
    out["causal_block_mask_fast"] = Case(Q=120, KV=150, tables=create_causal_block_mask_fast(
        2, 4, 120, 150, "cpu", block_size=32), peer_mask=causal_mask)
    return out


def _distinct(topk, n):
    """Top-k lists without repeats (attention-gym selects distinct tiles)."""
    rows = topk.reshape(-1, topk.shape[-1]).tolist()
    fixed = []
    for r in rows:
        seen = []
        for t in r + list(range(n)):
            if t not in seen:
                seen.append(t)
        fixed.append(seen[:len(r)])
    return torch.tensor(fixed, dtype=torch.int32).view(topk.shape)


XFAIL = {
    "tanh_softcap_approx": "approx=True calls the custom op approx::tanh through an autograd.Function, whose "
                           "meaning attnc cannot read; approx=False traces",
}

CASES = cases()


def _truth(case, q, k, v):
    """(out, lse) of the case in float64: torch's eager flex_attention, or the tables written out."""
    if case.tables is None:
        bm = tf.create_block_mask(case.mask_mod, case.B, case.H, case.Q, case.KV, device="cpu", BLOCK_SIZE=BLOCK) \
            if case.mask_mod is not None else None
        return tf.flex_attention(q, k, v, case.score_mod, bm, enable_gqa=True, return_lse=True)
    bm = case.tables
    dense = bm.to_dense().bool()
    full = tf.BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                       seq_lengths=bm.seq_lengths).to_dense().bool() \
        if bm.full_kv_num_blocks is not None else torch.zeros_like(dense)
    bq, bk = bm.BLOCK_SIZE
    qb, kb = torch.arange(case.Q) // bq, torch.arange(case.KV) // bk
    mask = tf.create_mask(bm.mask_mod, case.B, case.H, case.Q, case.KV, device="cpu")
    keep = full[:, :, qb][:, :, :, kb] | (dense[:, :, qb][:, :, :, kb] & mask)
    s = q @ k.repeat_interleave(case.H // case.HKV, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]).nan_to_num(0.0) @ v.repeat_interleave(case.H // case.HKV, 1), lse


def _block_mask(case):
    if case.tables is not None:
        return case.tables
    if case.mask_mod is None:
        return None
    return tf.create_block_mask(case.mask_mod, case.B, case.H, case.Q, case.KV, device="cpu", BLOCK_SIZE=BLOCK)


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
                                  if n in XFAIL else n for n in CASES])
def test_attn_gym_mod_matches_flexattention(name):
    case = CASES[name]
    g = generator(len(name))
    q = torch.randn(case.B, case.H, case.Q, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(case.B, case.HKV, case.KV, 16, generator=g, dtype=torch.float64) for _ in range(2))
    want, want_lse = _truth(case, q, k, v)
    bm = _block_mask(case)
    out, lse = attnc.flex_attention(q, k, v, case.score_mod, bm, enable_gqa=True, return_lse=True)
    assert _err(out, want) <= case.tol64
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and _err(lse[finite], want_lse[finite]) <= case.tol64
    q32, k32, v32 = (t.float() for t in (q, k, v))
    peer_bm = bm if case.tables is None else tf.create_block_mask(
        case.peer_mask, case.B, case.H, case.Q, case.KV, device="cpu", BLOCK_SIZE=BLOCK)
    peer = tf.flex_attention(q32, k32, v32, case.score_mod, peer_bm, enable_gqa=True)
    assert _err(peer, want) <= 1e-3, "the peer's mask_mod says what the tables say"
    ours = attnc.flex_attention(q32, k32, v32, case.score_mod, bm, enable_gqa=True)
    assert _err(ours, want) <= max(2 * _err(peer, want), 1e-5)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.mask_mod is not None and c.tables is None
                                  and n not in XFAIL])
def test_attn_gym_mask_through_create_block_mask_equals_torchs(name):
    case = CASES[name]
    ours = attnc.create_block_mask(case.mask_mod, case.B, case.H, case.Q, case.KV, device="cpu", BLOCK_SIZE=16)
    theirs = tf.create_block_mask(case.mask_mod, case.B, case.H, case.Q, case.KV, device="cpu", BLOCK_SIZE=16)
    for table in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(ours, table), getattr(theirs, table)), table
