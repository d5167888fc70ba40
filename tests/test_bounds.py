"""Bounds: param reads proven in bounds from the declarations, or checked at call time against the real
sizes and values; no kernel reads memory it was not given."""
from __future__ import annotations

import pytest
import torch

import attnc
from attnc import CallError
from attnc.passes.bounds import Access, accesses, symbolic_range

try:
    from helpers import check_against_oracle, example, qkv
except ImportError:
    from tests.helpers import check_against_oracle, example, qkv

NESTED = """variant nested_offsets
param doc: i32[L]
param offsets: f32[NDOC]
score = score + offsets[doc[q_idx]]
"""
# the document and T5 examples as they were first written: a free dim indexed by q_idx and kv_idx, and a
# relative position table of one entry per offset (the examples themselves may change shape)
DOC = """variant document
param doc: i32[L]
mask = q_idx >= kv_idx and doc[q_idx] == doc[kv_idx]
"""
T5 = """variant t5_bias
param rel_bias: f32[H, R]
score = score + rel_bias[h, q_idx - kv_idx + KV - 1]
"""
LITERAL = """variant literal_dim
param bias: f32[4]
score = score + bias[h]
"""


def reads(attn) -> dict[tuple[str, int], bool]:
    return {(a.param, a.axis): a.proven for a in attn.plan().bounds if isinstance(a, Access)}


def test_per_head_param_is_proven():
    attn = attnc.compile(example("alibi"))
    assert reads(attn) == {("slopes", 0): True}


@pytest.mark.parametrize("name", ["alibi", "sinks", "temperature", "moa"])
def test_every_read_indexed_by_h_with_dim_H_is_proven(name):
    attn = attnc.compile(example(name))
    assert all(reads(attn).values())


def test_the_proof_is_symbolic():
    from attnc.ir import expr as E
    lo, hi = symbolic_range(E.index("q_idx") - E.index("kv_idx") + E.size("KV") - 1)
    assert str(lo) == "0" and str(hi).replace(" ", "") in ("KV+Q-2", "Q+KV-2")
    assert symbolic_range(E.make(E.Op.MUL, E.index("q_idx"), E.index("kv_idx"))) is None     # not affine


def test_free_dim_is_checked_at_call_time():
    attn = attnc.compile(DOC)
    assert reads(attn) == {("doc", 0): False}
    q, k, v = qkv(1, 2, 2, 100, 100, 8)
    doc = torch.zeros(99, dtype=torch.int32)
    with pytest.raises(CallError, match="doc"):
        attn(q, k, v, doc=doc)
    attn(q, k, v, doc=torch.zeros(100, dtype=torch.int32))
    attn(q, k, v, doc=torch.zeros(180, dtype=torch.int32))          # longer than needed is fine


def test_free_dim_must_cover_the_longer_of_q_and_kv():
    attn = attnc.compile(DOC)
    q, k, v = qkv(1, 2, 2, 30, 70, 8)
    with pytest.raises(CallError, match="doc"):
        attn(q, k, v, doc=torch.zeros(30, dtype=torch.int32))
    doc = torch.arange(70, dtype=torch.int32) // 10
    check_against_oracle(attn, q, k, v, {"doc": doc})


def test_relative_bias_needs_q_plus_kv_minus_one():
    attn = attnc.compile(T5)
    assert reads(attn) == {("rel_bias", 0): True, ("rel_bias", 1): False}
    B, H, Q, KV = 1, 2, 33, 47
    q, k, v = qkv(B, H, H, Q, KV, 8)
    with pytest.raises(CallError, match="rel_bias"):
        attn(q, k, v, rel_bias=torch.randn(H, Q + KV - 2))
    check_against_oracle(attn, q, k, v, {"rel_bias": torch.randn(H, Q + KV - 1)})


def test_relative_bias_of_the_wrong_head_count_is_a_shape_error():
    attn = attnc.compile(T5)
    q, k, v = qkv(1, 2, 2, 8, 8, 8)
    with pytest.raises(CallError, match="rel_bias"):
        attn(q, k, v, rel_bias=torch.randn(3, 15))


def test_nested_index_values_are_checked():
    attn = attnc.compile(NESTED)
    assert reads(attn) == {("doc", 0): False, ("offsets", 0): False}
    q, k, v = qkv(1, 2, 2, 10, 10, 8)
    doc = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3], dtype=torch.int32)
    check_against_oracle(attn, q, k, v, {"doc": doc, "offsets": torch.rand(4)})
    with pytest.raises(CallError, match="offsets"):
        attn(q, k, v, doc=doc, offsets=torch.rand(3))               # doc reaches 3, offsets has 3 entries
    with pytest.raises(CallError, match="offsets"):
        attn(q, k, v, doc=doc - 1, offsets=torch.rand(4))           # a negative id
    with pytest.raises(CallError, match="offsets"):
        attn(q, k, v, doc=doc * 100, offsets=torch.rand(4))


def test_literal_dim_indexed_by_a_larger_h():
    attn = attnc.compile(LITERAL)
    assert reads(attn) == {("bias", 0): False}                       # H is not known to be <= 4
    q, k, v = qkv(1, 8, 2, 10, 10, 8)
    with pytest.raises(CallError, match="bias"):
        attn(q, k, v, bias=torch.rand(4))
    q, k, v = qkv(1, 4, 2, 10, 10, 8)
    check_against_oracle(attn, q, k, v, {"bias": torch.rand(4)})
    q, k, v = qkv(1, 2, 2, 10, 10, 8)
    check_against_oracle(attn, q, k, v, {"bias": torch.rand(4)})


def test_reads_in_masks_are_checked_too():
    attn = attnc.compile("variant m\nparam keep: bool[L]\nmask = keep[kv_idx]\n")
    q, k, v = qkv(1, 1, 1, 16, 24, 8)
    with pytest.raises(CallError, match="keep"):
        attn(q, k, v, keep=torch.ones(16, dtype=torch.bool))
    keep = torch.arange(24) % 3 != 0
    check_against_oracle(attn, q, k, v, {"keep": keep})


def test_index_shifted_past_the_end_is_caught():
    attn = attnc.compile("variant s\nparam bias: f32[KV]\nscore = score + bias[kv_idx + 1]\n")
    q, k, v = qkv(1, 1, 1, 8, 8, 8)
    assert not all(reads(attn).values())
    with pytest.raises(CallError, match="bias"):
        attn(q, k, v, bias=torch.rand(8))


def test_index_shifted_inside_is_proven():
    attn = attnc.compile("variant s\nparam bias: f32[KV]\nscore = score + bias[KV - 1 - kv_idx]\n")
    assert all(reads(attn).values())
    q, k, v = qkv(1, 1, 1, 8, 12, 8)
    check_against_oracle(attn, q, k, v, {"bias": torch.rand(12)})


def test_accesses_list_every_axis():
    attn = attnc.compile(T5)
    c = attn.cascade()
    assert [(a.param, a.axis, a.dim) for a in accesses(c)] == [("rel_bias", 0, "H"), ("rel_bias", 1, "R")]
