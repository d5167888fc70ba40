"""Block sparsity against the mask evaluated densely: never EMPTY where a pair is kept, never FULL where a pair
is masked; exact for affine masks; O(tiles) work."""
from __future__ import annotations

import time

import pytest
import torch

import attnc
from attnc.passes.block_sparsity import EMPTY, FULL, PARTIAL
from attnc.runtime.reference import evaluate, index_env

try:
    from helpers import EXAMPLES, example, generator, random_params
except ImportError:
    from tests.helpers import EXAMPLES, example, generator, random_params

MASKED = [p.stem for p in EXAMPLES if attnc.compile(str(p)).variant.mask is not None]
AFFINE = ["causal", "sliding_window", "prefix_lm", "streaming_llm", "dilated_sliding_window"]
BLOCKS = [(16, 16), (64, 32), (128, 128), (7, 13), (256, 512)]
SIZES = [(1, 2, 300, 333), (2, 4, 129, 77)]        # (B, H, Q, KV): ragged, Q != KV both ways


def dense_mask(attn, B, H, Q, KV, params) -> torch.Tensor:
    sizes = {"B": B, "H": H, "HKV": H, "Q": Q, "KV": KV, "D": 16}
    return evaluate(attn.variant.mask, index_env(B, H, Q, KV, sizes), params).expand(B, H, Q, KV)


def classify(attn, B, H, Q, KV, params, bm, bn) -> torch.Tensor:
    sizes = {"B": B, "H": H, "HKV": H, "Q": Q, "KV": KV, "D": 16}
    for p in attn.variant.params.values():          # free dims bound from the tensors, as a call binds them
        for d, n in zip(p.dims, params[p.name].shape):
            if isinstance(d, str):
                sizes.setdefault(d, n)
    return attn.plan().sparsity.classify(sizes, params, bm, bn)


def tile_stats(dense: torch.Tensor, bm: int, bn: int):
    """(any kept, all kept) per tile, over every batch and head."""
    B, H, Q, KV = dense.shape
    nq, nk = -(-Q // bm), -(-KV // bn)
    pad = torch.zeros(B, H, nq * bm, nk * bn, dtype=torch.int8)
    valid = torch.zeros_like(pad)
    pad[:, :, :Q, :KV] = dense.to(torch.int8)
    valid[:, :, :Q, :KV] = 1
    kept = pad.view(B, H, nq, bm, nk, bn).sum(dim=(0, 1, 3, 5))
    total = valid.view(B, H, nq, bm, nk, bn).sum(dim=(0, 1, 3, 5))
    return kept > 0, kept == total


def assert_sound(cls: torch.Tensor, dense: torch.Tensor, bm: int, bn: int):
    some, every = tile_stats(dense, bm, bn)
    assert cls.shape == some.shape
    assert not (some & (cls == EMPTY)).any(), "a tile with a kept pair was called empty"
    assert not (~every & (cls == FULL)).any(), "a tile with a masked pair was called full"
    return some, every


@pytest.mark.parametrize("bm, bn", BLOCKS, ids=[f"{a}x{b}" for a, b in BLOCKS])
@pytest.mark.parametrize("name", MASKED)
def test_classification_is_sound(name, bm, bn):
    attn = attnc.compile(example(name))
    for B, H, Q, KV in SIZES:
        params = random_params(attn, B, H, H, Q, KV, 16, seed=Q)
        cls = classify(attn, B, H, Q, KV, params, bm, bn)
        assert_sound(cls, dense_mask(attn, B, H, Q, KV, params), bm, bn)


@pytest.mark.parametrize("bm, bn", [(16, 16), (7, 13), (64, 128), (1, 1), (300, 5)])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm"])
def test_affine_masks_are_exact(name, bm, bn):
    attn = attnc.compile(example(name), **({"window": 40} if name == "sliding_window" else {}))
    assert attn.plan().sparsity.exact
    for B, H, Q, KV in SIZES:
        cls = classify(attn, B, H, Q, KV, {}, bm, bn)
        some, every = assert_sound(cls, dense_mask(attn, B, H, Q, KV, {}), bm, bn)
        partial = cls == PARTIAL
        assert not (partial & every).any(), "a PARTIAL tile has every pair kept"
        assert not (partial & ~some).any(), "a PARTIAL tile has no pair kept"


@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 64), (128, 128), (256, 512)])
def test_streaming_llm_is_exact_at_power_of_two_blocks(bm, bn):
    attn = attnc.compile(example("streaming_llm"))
    B, H, Q, KV = 1, 1, 1100, 1300
    cls = classify(attn, B, H, Q, KV, {}, bm, bn)
    some, every = assert_sound(cls, dense_mask(attn, B, H, Q, KV, {}), bm, bn)
    assert not ((cls == PARTIAL) & (every | ~some)).any()


def test_streaming_llm_is_exact_at_odd_blocks():
    attn = attnc.compile(example("streaming_llm"))
    cls = classify(attn, 1, 1, 600, 700, {}, 7, 13)
    some, every = assert_sound(cls, dense_mask(attn, 1, 1, 600, 700, {}), 7, 13)
    assert not ((cls == PARTIAL) & (every | ~some)).any()


@pytest.mark.parametrize("sort", [True, False], ids=["packed", "shuffled"])
def test_document_masks_with_random_doc_ids(sort):
    attn = attnc.compile(example("document"))
    g = generator(7)
    for trial in range(4):
        L = int(torch.randint(50, 400, (1,), generator=g))
        doc = torch.randint(0, int(torch.randint(1, 12, (1,), generator=g)), (L,), generator=g)
        doc = (doc.sort().values if sort else doc).to(torch.int32)
        for bm, bn in [(16, 16), (32, 8), (64, 64)]:
            cls = classify(attn, 1, 1, L, L, {"doc": doc}, bm, bn)
            some, every = assert_sound(cls, dense_mask(attn, 1, 1, L, L, {"doc": doc}), bm, bn)
            if sort:     # packed documents: a tile across no document boundary is decided by causality alone
                assert (cls == EMPTY).sum() >= (~some).sum() // 2


def test_document_blocks_off_the_diagonal_are_skipped():
    attn = attnc.compile(example("document"))
    doc = torch.arange(8).repeat_interleave(64).to(torch.int32)        # 8 documents of one 64-block each
    cls = classify(attn, 1, 1, 512, 512, {"doc": doc}, 64, 64)
    assert torch.equal(cls != EMPTY, torch.eye(8, dtype=torch.bool))


def test_moa_classification_takes_the_union_over_heads():
    attn = attnc.compile(example("moa"))
    widths = torch.tensor([1, 200], dtype=torch.int32)
    cls = classify(attn, 1, 2, 256, 256, {"widths": widths}, 32, 32)
    dense = dense_mask(attn, 1, 2, 256, 256, {"widths": widths})
    some, _ = assert_sound(cls, dense, 32, 32)
    assert ((cls != EMPTY) == some).all()


def test_no_mask_means_every_tile_full():
    attn = attnc.compile(example("full"))
    cls = attn.plan().sparsity.classify({"B": 1, "H": 1, "HKV": 1, "Q": 100, "KV": 300, "D": 8}, {}, 32, 64)
    assert cls.shape == (4, 5) and (cls == FULL).all()


def test_causal_counts():
    cls = attnc.compile(example("causal")).plan().sparsity.classify(
        {"B": 1, "H": 1, "HKV": 1, "Q": 1024, "KV": 1024, "D": 8}, {}, 128, 128)
    assert (cls == PARTIAL).sum() == 8 and (cls == FULL).sum() == 28 and (cls == EMPTY).sum() == 28


# -- cost: O(tiles), never O(Q * KV) --

@pytest.mark.parametrize("name", ["causal", "streaming_llm", "natten", "document"])
def test_classification_never_materializes_the_mask(name):
    # a dense S x S mask at S = 2**20 is 2**40 entries: it could not even be allocated, so finishing quickly
    # means the work is per tile (here 1024 x 1024 tiles) plus one pass over each param
    attn = attnc.compile(example(name))
    S = 2 ** 20
    params = {"doc": torch.arange(S, dtype=torch.int32) // 5000} if name == "document" else {}
    start = time.perf_counter()
    cls = classify(attn, 1, 8, S, S, params, 1024, 1024)
    elapsed = time.perf_counter() - start
    assert cls.shape == (1024, 1024)
    assert elapsed < 10.0, f"classify took {elapsed:.1f}s for 2**20 tiles"
    if name == "causal":
        assert (cls == PARTIAL).sum() == 1024 and (cls == EMPTY).sum() == 1024 * 1023 // 2


def test_classification_cost_follows_tiles_not_length():
    attn = attnc.compile(example("sliding_window"))

    def timed(S, block):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            classify(attn, 1, 1, S, S, {}, block, block)
            best = min(best, time.perf_counter() - start)
        return best
    small, large = timed(2 ** 12, 16), timed(2 ** 18, 1024)     # the same 256 x 256 tiles, 4096x the pairs
    assert large < 20 * small + 0.05, (small, large)


# -- what the runtime does with it --

def test_runtime_tiles_leave_out_empty_tiles_and_flag_full_ones():
    attn = attnc.compile(example("sliding_window"), window=300)
    plan = attn.plan()
    sizes = {"B": 1, "H": 1, "HKV": 1, "Q": 1000, "KV": 1000, "D": 8}
    tiles = attn.tiles(plan, sizes, {})
    dense = dense_mask(attn, 1, 1, 1000, 1000, {})[0, 0]
    seen = 0
    for start_m, kv in tiles:
        rows = dense[start_m:start_m + plan.block_m]
        for start_n, end_n, full in kv:
            block = rows[:, start_n:end_n]
            assert block.any()
            assert not full or block.all()
            seen += int(block.sum())
    assert seen == int(dense.sum()), "every kept pair lies in a visited tile"
