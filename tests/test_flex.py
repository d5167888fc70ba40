"""attnc.flex_attention and attnc.create_block_mask against FlexAttention's semantics.

The oracle for a BlockMask is built here from its tables, block by block: torch's eager flex_attention on a
CPU reads only the mask_mod of a BlockMask and ignores its tables, so it cannot judge them."""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as tf

import attnc
from attnc import flex
from attnc.runtime.inputs import random_params

try:
    from helpers import example, generator
except ImportError:
    from tests.helpers import example, generator


@pytest.fixture(autouse=True)
def quiet_torch(monkeypatch):
    """torch's eager flex_attention as a plain function (its debug path), without warnings."""
    monkeypatch.setattr(tf, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def qkv(B, H, HKV, Q, KV, D=16, dtype=torch.float64, seed=0):
    g = generator(seed)
    return (torch.randn(B, H, Q, D, generator=g).to(dtype), torch.randn(B, HKV, KV, D, generator=g).to(dtype),
            torch.randn(B, HKV, KV, D, generator=g).to(dtype))


def dense_attention(q, k, v, keep, scale=None):
    """Softmax attention over the pairs keep [B|1, H|1, Q, KV] allows, materialized in q's dtype: (out, lse)."""
    H, HKV = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(H // HKV, 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def points(fn, B, H, Q, KV):
    """fn(b, h, q_idx, kv_idx) on every point, evaluated by torch (the meaning of a mask_mod)."""
    return tf.create_mask(fn, B, H, Q, KV, device="cpu")


def from_dense(partial, full=None, block=(64, 64), mask_mod=None, lengths=None):
    """A BlockMask from dense [B, H, query blocks, key blocks] tables, in FlexAttention's ordered form."""
    def ordered(d):
        d = d.to(torch.int32)
        return d.sum(-1).to(torch.int32), torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)
    full_tables = ordered(full) if full is not None else (None, None)
    return tf.BlockMask.from_kv_blocks(*ordered(partial), *full_tables, BLOCK_SIZE=block, mask_mod=mask_mod,
                                       seq_lengths=lengths)


def table_keep(partial, full, mask, bq, bk, Q, KV):
    """What a BlockMask selects, written out point by point: full blocks whole, partial blocks where the
    mask holds, other blocks nothing."""
    qb = torch.arange(Q) // bq
    kb = torch.arange(KV) // bk
    keep = partial[:, :, qb][:, :, :, kb] & mask
    if full is not None:
        keep = keep | full[:, :, qb][:, :, :, kb]
    return keep


# -- the call: torch's signature, options, outputs --
def test_signature_is_torchs_in_its_order():
    ours = inspect.signature(attnc.flex_attention).parameters
    theirs = inspect.signature(tf.flex_attention).parameters
    assert list(ours) == list(theirs)
    assert [p.kind for p in ours.values()] == [p.kind for p in theirs.values()]
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_outputs_lse_and_aux_like_flexattention():
    q, k, v = qkv(2, 4, 2, 40, 56, dtype=torch.float32)
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx        # noqa: E731
    bm = tf.create_block_mask(causal, None, None, 40, 56, device="cpu", BLOCK_SIZE=16)
    want, want_lse = tf.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    out, aux = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_aux=tf.AuxRequest(lse=True))
    assert isinstance(aux, tf.AuxOutput) and aux.max_scores is None
    assert out.dtype == q.dtype and aux.lse.dtype == torch.float32
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(aux.lse, want_lse, atol=1e-5)
    out2, lse2 = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert torch.equal(out2, out) and torch.equal(lse2, aux.lse)
    out3, aux3 = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_aux=tf.AuxRequest())
    assert torch.equal(out3, out) and aux3.lse is None
    with pytest.raises(attnc.CallError, match="return_lse and return_aux"):
        attnc.flex_attention(q, k, v, return_lse=True, return_aux=tf.AuxRequest(lse=True), enable_gqa=True)
    with pytest.raises(attnc.CallError, match="max_scores"):
        attnc.flex_attention(q, k, v, return_aux=tf.AuxRequest(max_scores=True), enable_gqa=True)


def test_heads_without_enable_gqa_raise_like_flexattention():
    q, k, v = qkv(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        tf.flex_attention(q, k, v)
    with pytest.raises(attnc.CallError, match="enable_gqa=True"):
        attnc.flex_attention(q, k, v)


def test_speed_options_are_accepted_and_others_named():
    q, k, v = qkv(1, 2, 2, 24, 24)
    want = attnc.flex_attention(q, k, v)
    opts = {"BLOCK_M": 32, "fwd_num_warps": 4, "bwd_BLOCK_N1": 16, "PRESCALE_QK": True, "BACKEND": "AUTO",
            "ROWS_GUARANTEED_SAFE": True}
    assert torch.equal(attnc.flex_attention(q, k, v, kernel_options=opts), want)
    with pytest.raises(attnc.CallError, match="BACKEND"):
        attnc.flex_attention(q, k, v, kernel_options={"BACKEND": "FLASH"})
    with pytest.raises(attnc.CallError, match="OUTPUT_MAX"):
        attnc.flex_attention(q, k, v, kernel_options={"OUTPUT_MAX": True})
    with pytest.raises(attnc.CallError, match="kernel_options"):
        attnc.flex_attention(q, k, v, kernel_options=[("BLOCK_M", 32)])


def test_key_and_value_of_batch_one_broadcast_under_a_block_mask_of_the_query_batch():
    q, _, _ = qkv(3, 2, 2, 32, 32)
    _, k, v = qkv(1, 2, 2, 32, 32, seed=1)
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx        # noqa: E731
    bm = tf.create_block_mask(causal, 3, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    keep = points(causal, 1, 1, 32, 32)
    want, _ = dense_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), keep)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)
    with pytest.raises(attnc.CallError, match="batch"):
        attnc.flex_attention(q, k, v)


def test_inputs_that_need_gradients_get_them_or_an_error_never_a_detached_result():
    q, k, v = qkv(1, 2, 2, 16, 16)
    q.requires_grad_(True)
    try:
        out = attnc.flex_attention(q, k, v)
    except attnc.CallError as e:
        assert "gradients" in str(e)
    else:
        assert out.requires_grad
    with torch.no_grad():
        assert not attnc.flex_attention(q, k, v).requires_grad


# -- regression: closed-over tensors are read at every call --
def test_a_rebound_closure_tensor_is_read_at_the_next_call():
    B, H, S = 2, 2, 96
    q, k, v = qkv(B, H, H, S, S)
    doc = torch.zeros(S, dtype=torch.int32)

    def doc_mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    first = attnc.flex_attention(q, k, v, block_mask=doc_mask)
    assert torch.allclose(first, dense_attention(q, k, v, points(doc_mask, 1, 1, S, S))[0], atol=1e-12)
    for step in range(3):                                   # a new batch: the document ids are rebound
        doc = torch.sort(torch.randint(0, 4, (S,), generator=generator(step))).values.int()
        want = dense_attention(q, k, v, points(doc_mask, 1, 1, S, S))[0]
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=doc_mask), want, atol=1e-12)
        bm = tf.create_block_mask(doc_mask, None, None, S, S, device="cpu", BLOCK_SIZE=32)
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)
    doc[: S // 2] = 7                                        # changed in place
    want = dense_attention(q, k, v, points(doc_mask, 1, 1, S, S))[0]
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=doc_mask), want, atol=1e-12)
    bm = tf.create_block_mask(doc_mask, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)


def test_a_rebound_score_tensor_and_python_number_are_read_at_the_next_call():
    q, k, v = qkv(1, 4, 4, 48, 48)
    slopes, cap = torch.rand(4, dtype=torch.float64), 20.0

    def alibi_softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh((score - slopes[h] * (q_idx - kv_idx)) / cap)

    def want():
        s = (q @ k.transpose(-1, -2)) / 4 - slopes[:, None, None] * (torch.arange(48)[:, None] - torch.arange(48))
        return torch.softmax(cap * torch.tanh(s / cap), -1) @ v

    assert torch.allclose(attnc.flex_attention(q, k, v, score_mod=alibi_softcap), want(), atol=1e-12)
    slopes, cap = torch.rand(4, dtype=torch.float64) * 3, 5.0
    assert torch.allclose(attnc.flex_attention(q, k, v, score_mod=alibi_softcap), want(), atol=1e-12)


def test_a_fresh_closure_per_step_reuses_one_kernel(monkeypatch):
    monkeypatch.setattr(flex, "_KERNELS", flex._LRU())
    q, k, v = qkv(1, 2, 2, 32, 32)
    for step in range(6):
        doc = torch.sort(torch.randint(0, 3, (32,), generator=generator(step))).values

        def doc_mask(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        want = dense_attention(q, k, v, points(doc_mask, 1, 1, 32, 32))[0]
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=doc_mask), want, atol=1e-12)
    assert len(flex._KERNELS) == 1


def test_the_kernel_cache_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(flex, "_KERNELS", flex._LRU())
    monkeypatch.setattr(flex, "CACHE_SIZE", 3)
    q, k, v = qkv(1, 1, 1, 16, 16)
    windows = [1, 2, 3, 4, 5]
    for w in windows:
        attnc.flex_attention(q, k, v, block_mask=lambda b, h, q_idx, kv_idx, w=w: (q_idx - kv_idx).abs() <= w)
    assert len(flex._KERNELS) == 3
    kept = [c.variant.mask for c in flex._KERNELS.values()]
    assert all("5" in repr(m) or "4" in repr(m) or "3" in repr(m) for m in kept)


# -- regression: a BlockMask's tables are honoured --
SHAPES = [  # B, H, HKV, Q, KV, (BQ, BK), table batch/head dims
    (2, 4, 2, 150, 200, (64, 32), (2, 4)),
    (1, 2, 2, 128, 128, (32, 32), (1, 1)),
    (3, 2, 1, 77, 45, (16, 64), (3, 1)),
    (2, 3, 3, 1, 130, (128, 128), (1, 3)),
]


@pytest.mark.parametrize("B,H,HKV,Q,KV,block,table_bh", SHAPES, ids=lambda x: str(x))
def test_data_dependent_block_selection_is_computed_as_the_tables_say(B, H, HKV, Q, KV, block, table_bh):
    bq, bk = block
    nq, nk = -(-Q // bq), -(-KV // bk)
    g = generator(Q + KV)
    chosen = torch.rand(*table_bh, nq, nk, generator=g) < 0.5
    full = chosen & (torch.rand(*table_bh, nq, nk, generator=g) < 0.4)
    partial = chosen & ~full
    causal = lambda b, h, q_idx, kv_idx: q_idx + (KV - Q) >= kv_idx     # noqa: E731
    bm = from_dense(partial, full, block, causal, (Q, KV))
    q, k, v = qkv(B, H, HKV, Q, KV, seed=B + Q)
    keep = table_keep(partial, full, points(causal, 1, 1, Q, KV), bq, bk, Q, KV)
    want, want_lse = dense_attention(q, k, v, keep)
    out, lse = attnc.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert torch.allclose(lse.nan_to_num(0, neginf=0), want_lse.nan_to_num(0, neginf=0), atol=1e-12)
    # float32 against the same oracle, bounded by twice the error of a float32 materialization
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out32 = attnc.flex_attention(q32, k32, v32, block_mask=bm, enable_gqa=True)
    eager_err = (dense_attention(q32, k32, v32, keep)[0].double() - want).abs().max().item()
    assert (out32.double() - want).abs().max().item() <= max(2 * eager_err, 1e-5)


def test_a_full_block_skips_mask_mod_and_an_unlisted_block_is_never_computed():
    # mask_mod says "nothing": only what the tables list as full is computed
    nothing = lambda b, h, q_idx, kv_idx: q_idx < 0              # noqa: E731
    full = torch.tensor([[[[True, False], [False, True]]]])
    partial = torch.tensor([[[[False, True], [False, False]]]])
    bm = from_dense(partial, full, (32, 32), nothing, (64, 64))
    q, k, v = qkv(1, 1, 1, 64, 64)
    keep = torch.zeros(64, 64, dtype=torch.bool)
    keep[:32, :32] = keep[32:, 32:] = True
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), dense_attention(q, k, v, keep)[0],
                          atol=1e-12)
    # a noop mask_mod with tables that leave blocks out: those blocks are not computed
    bm = from_dense(partial | full, None, (32, 32), None, (64, 64))
    keep[:32, 32:] = True
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), dense_attention(q, k, v, keep)[0],
                          atol=1e-12)


def test_tables_that_add_nothing_to_mask_mod_compile_the_mask_alone(monkeypatch):
    monkeypatch.setattr(flex, "_KERNELS", flex._LRU())
    sliding = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < 40)   # noqa: E731
    q, k, v = qkv(1, 2, 2, 200, 200)
    want = dense_attention(q, k, v, points(sliding, 1, 1, 200, 200))[0]
    for separate in (True, False):
        bm = tf.create_block_mask(sliding, None, None, 200, 200, device="cpu", BLOCK_SIZE=32,
                                  separate_full_blocks=separate)
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)
    assert len(flex._KERNELS) == 1
    assert not any(p.startswith("block_") for c in flex._KERNELS.values() for p in c.variant.params)


def test_a_block_mask_for_other_lengths_raises_where_flexattention_does():
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx        # noqa: E731
    bm = tf.create_block_mask(causal, None, None, 128, 128, device="cpu")
    for Q, KV in ((64, 128), (128, 256), (100, 100)):
        q, k, v = qkv(1, 1, 1, Q, KV)
        with pytest.raises(ValueError) as theirs:
            tf.flex_attention(q, k, v, block_mask=bm)
        with pytest.raises(attnc.CallError) as ours:
            attnc.flex_attention(q, k, v, block_mask=bm)
        assert "block_mask was created for" in str(ours.value)
        assert ("smaller length" in str(ours.value)) == ("smaller length" in str(theirs.value))


def test_a_sliced_block_mask_without_its_mask_mod_raises():
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx        # noqa: E731
    bm = tf.create_block_mask(causal, 2, None, 128, 128, device="cpu", BLOCK_SIZE=64)[1]
    q, k, v = qkv(1, 1, 1, 128, 128)
    with pytest.raises(attnc.CallError, match="sliced BlockMask"):
        attnc.flex_attention(q, k, v, block_mask=bm)


def test_malformed_tables_are_refused_by_name():
    q, k, v = qkv(1, 1, 1, 64, 64)
    twice = tf.BlockMask.from_kv_blocks(torch.tensor([[[2, 1]]], dtype=torch.int32),
                                        torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32), BLOCK_SIZE=32)
    with pytest.raises(attnc.CallError, match="twice"):
        attnc.flex_attention(q, k, v, block_mask=twice)
    both = from_dense(torch.tensor([[[[True, False], [False, True]]]]),
                      torch.tensor([[[[True, False], [False, False]]]]), (32, 32), None, (64, 64))
    with pytest.raises(attnc.CallError, match="both as full"):
        attnc.flex_attention(q, k, v, block_mask=both)
    negative = tf.BlockMask.from_kv_blocks(torch.tensor([[[1, 1]]], dtype=torch.int32),
                                           torch.tensor([[[[-1, 0], [1, 0]]]], dtype=torch.int32), BLOCK_SIZE=32)
    with pytest.raises(attnc.CallError, match="negative"):
        attnc.flex_attention(q, k, v, block_mask=negative)
    wide = from_dense(torch.ones(2, 1, 2, 2, dtype=torch.bool), None, (32, 32), None, (64, 64))
    with pytest.raises(attnc.CallError, match="batch"):
        attnc.flex_attention(*qkv(3, 1, 1, 64, 64), block_mask=wide)


def test_and_or_noop_masks_and_from_kv_blocks_work_as_inputs():
    S = 96
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx        # noqa: E731
    near = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < 10   # noqa: E731
    sink = lambda b, h, q_idx, kv_idx: kv_idx < 4                # noqa: E731
    q, k, v = qkv(2, 2, 2, S, S)
    for mask in (tf.and_masks(causal, tf.or_masks(near, sink)), tf.noop_mask, tf.and_masks()):
        want = dense_attention(q, k, v, points(mask, 1, 1, S, S))[0]
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=mask), want, atol=1e-12)
        bm = tf.create_block_mask(mask, 2, 2, S, S, device="cpu", BLOCK_SIZE=32)
        assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)


# -- create_block_mask --
def _masks():
    g = generator(5)
    doc = torch.sort(torch.randint(0, 6, (333,), generator=g)).values
    doc_b = torch.sort(torch.randint(0, 4, (2, 333), generator=g), dim=-1).values
    widths = torch.tensor([8, 40, 100])
    return {
        "causal": lambda b, h, q, kv: q >= kv,
        "sliding_window": lambda b, h, q, kv: (q >= kv) & (q - kv < 64),
        "prefix_lm": lambda b, h, q, kv: (q >= kv) | (kv < 50),
        "document": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
        "document_per_batch": lambda b, h, q, kv: doc_b[b, q] == doc_b[b, kv],
        "window_per_head": lambda b, h, q, kv: (q - kv).abs() < widths[h],
        "dilated": lambda b, h, q, kv: ((q - kv) % 3 == 0) & ((q - kv).abs() < 90),
        "natten": lambda b, h, q, kv: ((q // 19 - kv // 19).abs() <= 2) & ((q % 19 - kv % 19).abs() <= 2),
        "streaming": lambda b, h, q, kv: (q >= kv) & ((q - kv < 32) | (kv < 4)),
        "empty_rows": lambda b, h, q, kv: (q >= 100) & (kv < q - 100),
    }


@pytest.mark.parametrize("name", list(_masks()))
@pytest.mark.parametrize("Q,KV,block", [(333, 333, 64), (200, 333, (32, 128))])
def test_create_block_mask_equals_torchs(name, Q, KV, block):
    mask = _masks()[name]
    ours = attnc.create_block_mask(mask, 2, 3, Q, KV, device="cpu", BLOCK_SIZE=block)
    theirs = tf.create_block_mask(mask, 2, 3, Q, KV, device="cpu", BLOCK_SIZE=block)
    for table in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                  "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, table), getattr(theirs, table)), table
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE and ours.seq_lengths == theirs.seq_lengths
    assert ours.mask_mod is mask


def test_create_block_mask_without_full_blocks_and_with_defaults():
    mask = _masks()["sliding_window"]
    for kwargs in ({"separate_full_blocks": False}, {}):
        ours = attnc.create_block_mask(mask, None, None, 300, 300, device="cpu", **kwargs)
        theirs = tf.create_block_mask(mask, None, None, 300, 300, device="cpu", **kwargs)
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        assert (ours.full_kv_num_blocks is None) == (theirs.full_kv_num_blocks is None)


def test_a_mask_that_keeps_nothing_gives_zeros_and_minus_infinity():
    q, k, v = qkv(2, 2, 2, 96, 96)
    out, lse = attnc.flex_attention(q, k, v, block_mask=tf.or_masks(), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_flexattentions_one_block_mask_is_honoured_like_any_other():
    q, k, v = qkv(1, 2, 2, 40, 56)
    everything = tf._create_empty_block_mask(q, k)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=everything), attnc.flex_attention(q, k, v),
                          atol=1e-12)
    nothing = tf.BlockMask.from_kv_blocks(torch.zeros(1, 1, 1, dtype=torch.int32),
                                          torch.zeros(1, 1, 1, 1, dtype=torch.int32), BLOCK_SIZE=flex.NO_BLOCKS,
                                          seq_lengths=(1, 1))
    assert torch.equal(attnc.flex_attention(q, k, v, block_mask=nothing), torch.zeros_like(q))


def test_tables_per_batch_and_head_are_checked_per_batch_and_head(monkeypatch):
    monkeypatch.setattr(flex, "_KERNELS", flex._LRU())
    B, H, S = 2, 3, 160
    g = generator(9)
    doc = torch.sort(torch.randint(0, 4, (B, S), generator=g), dim=-1).values
    widths = torch.tensor([5, 30, 70])

    def mask(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & ((q_idx - kv_idx).abs() < widths[h])

    q, k, v = qkv(B, H, H, S, S)
    keep = points(mask, B, H, S, S)
    want = dense_attention(q, k, v, keep)[0]
    bm = tf.create_block_mask(mask, B, H, S, S, device="cpu", BLOCK_SIZE=32)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=bm), want, atol=1e-12)
    assert not any(p.startswith("block_") for c in flex._KERNELS.values() for p in c.variant.params)
    # one (b, h) whose tables leave out a block the mask keeps: the tables are honoured, for that pair only
    partial = bm.to_dense().bool() & ~tf.BlockMask.from_kv_blocks(
        bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=32).to_dense().bool()
    full = bm.to_dense().bool() & ~partial
    full[1, 2, 2, 2] = partial[1, 2, 2, 2] = False
    cut = from_dense(partial, full, (32, 32), mask, (S, S))
    keep_cut = table_keep(partial, full, keep, 32, 32, S, S)
    assert not torch.equal(keep_cut, keep)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=cut), dense_attention(q, k, v, keep_cut)[0],
                          atol=1e-12)


def test_a_mask_mod_reading_a_create_mask_tensor_traces():
    B, H, S = 2, 2, 80
    near = lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx).abs() < 9 + 5 * h) & (kv_idx % (b + 2) == 0)   # noqa: E731
    dense = tf.create_mask(near, B, H, S, S, device="cpu")

    def from_dense_mask(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    q, k, v = qkv(B, H, H, S, S)
    want = dense_attention(q, k, v, dense)[0]
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=from_dense_mask), want, atol=1e-12)
    ours = attnc.create_block_mask(from_dense_mask, B, H, S, S, device="cpu", BLOCK_SIZE=16)
    theirs = tf.create_block_mask(from_dense_mask, B, H, S, S, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_indices, theirs.full_kv_indices)


def test_analysed_block_masks_are_not_kept_alive(monkeypatch):
    import gc
    import weakref
    monkeypatch.setattr(flex, "_TABLES", flex._LRU())
    q, k, v = qkv(1, 1, 1, 64, 64)
    doc = torch.zeros(64, dtype=torch.int32)
    bm = tf.create_block_mask(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], None, None, 64, 64,
                              device="cpu", BLOCK_SIZE=32)
    attnc.flex_attention(q, k, v, block_mask=bm)
    assert len(flex._TABLES) == 1
    gone = weakref.ref(bm.kv_indices)
    del bm
    gc.collect()
    assert gone() is None


def test_create_block_mask_computes_dq_write_order_like_torch():
    mask = _masks()["sliding_window"]
    kw = dict(device="cpu", BLOCK_SIZE=64, compute_dq_write_order=True, dq_kv_order=False)
    ours, theirs = attnc.create_block_mask(mask, 1, 2, 300, 300, **kw), tf.create_block_mask(mask, 1, 2, 300, 300, **kw)
    assert torch.equal(ours.dq_write_order, theirs.dq_write_order)
    assert torch.equal(ours.dq_write_order_full, theirs.dq_write_order_full)
    assert ours.dq_kv_order_spt == theirs.dq_kv_order_spt


@pytest.mark.parametrize("name", ["alibi", "document", "t5_bias"])
def test_flex_mods_run_under_flexattention(name):
    # flex_mods are what the benchmarks hand FlexAttention: its vmap cannot read a tensor's value, so they
    # index params as torch code does, with no call-time bounds check
    attn = attnc.compile(example(name))
    B, H, S, D = 1, 4, 80, 16
    g = generator(3)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    params = random_params(attn, B, H, H, S, S, D, g)
    score_mod, mask_mod = attn.flex_mods(sizes={"Q": S, "KV": S}, **params)
    block_mask = tf.create_block_mask(mask_mod, B, H, S, S, device="cpu") if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # flex_attention uncompiled warns that it is unfused
        want = tf.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    assert (attn(q, k, v, **params) - want).abs().max().item() < 1e-5
