"""Decoding equals prefill for every example: the last n queries against all L keys give the full run's last
rows. A variant that reads q_idx as the query's position (top-left alignment) fails it, which the checks at
one shape cannot see: they compare a call with the oracle of the same call."""
from __future__ import annotations

import zlib

import pytest
import torch

import attnc
from attnc.runtime.decode_check import decode_matches_prefill

try:
    from helpers import EXAMPLE_IDS, EXAMPLES, example, generator
except ImportError:                                     # tests/ imported as a package
    from tests.helpers import EXAMPLE_IDS, EXAMPLES, example, generator

# examples whose score or normalizer reads the query count Q itself (not as q_idx + KV - Q): their rows do
# depend on how many queries a call has, so decoding differs from prefill by design. None do today:
# sigmoid's bias is -log(KV), the sequence length, which decoding and prefill share.
READS_Q = {}
ROW_POSITION = "let q_pos = q_idx + KV - Q"
# (B, H, HKV, Q, KV, D, Dv) of the decoding call: a token, a short run (speculative verification), one kv head
# with Dv != D; GQA, B > 1, KV past a tile edge and past a 256-key window
RUNS = {"one_token": (2, 4, 2, 1, 300, 16, 16), "five_tokens": (2, 4, 2, 5, 300, 16, 16),
        "mqa_ragged": (1, 4, 1, 3, 531, 16, 24)}

_cache: dict[str, attnc.Compiled] = {}


def compiled(name: str) -> attnc.Compiled:
    if name not in _cache:
        _cache[name] = attnc.compile(example(name))
    return _cache[name]


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=READS_Q[n]))
                                  if n in READS_Q else n for n in EXAMPLE_IDS])
def test_decoding_rows_equal_the_prefill_rows(name, run):
    seed = zlib.crc32(f"{name}/{run}".encode()) % 1000
    r = decode_matches_prefill(compiled(name), RUNS[run], generator=generator(seed))
    assert r["spec_err"] <= 1e-9, r
    assert r["ok"], r


def test_bf16_decoding_rows_equal_the_prefill_rows():
    for name in ("causal", "alibi", "document", "sliding_window"):
        r = decode_matches_prefill(compiled(name), (2, 4, 2, 3, 200, 16, 16), torch.bfloat16, 2e-2, generator(5))
        assert r["ok"], (name, r)


def _row_aligned_copies(tmp_path):
    """Every example with q_idx read as the query's position, as they were written before decoding."""
    for p in EXAMPLES:
        (tmp_path / p.name).write_text(p.read_text().replace(ROW_POSITION, "let q_pos = q_idx"))
    return tmp_path


def test_every_position_reading_example_says_so():
    readers = {p.stem for p in EXAMPLES if ROW_POSITION in p.read_text()}
    # the masks and biases of positions; alibi_softcap reads it through alibi.attn
    assert readers >= {"causal", "sliding_window", "dilated_sliding_window", "prefix_lm", "document",
                       "streaming_llm", "moa", "natten", "swin", "axial", "alibi", "sinks", "t5_bias"}
    for p in EXAMPLES:
        text = p.read_text()
        if "q_idx" in text:       # q_idx appears only in the line that makes it a position
            assert text.count("q_idx") == 1 and ROW_POSITION in text, p.name


@pytest.mark.parametrize("name", ["causal", "sliding_window", "dilated_sliding_window", "prefix_lm", "document",
                                  "streaming_llm", "moa", "natten", "swin", "axial", "alibi", "alibi_softcap",
                                  "sinks", "t5_bias"])
def test_the_check_catches_queries_aligned_at_the_top(tmp_path, name):
    attn = attnc.compile(str(_row_aligned_copies(tmp_path) / f"{name}.attn"))
    r = decode_matches_prefill(attn, (2, 4, 2, 4, 300, 16, 16), generator=generator(9))
    assert not r["ok"] and any("spec" in w for w in r["why"]), r


def test_a_bias_of_the_query_count_differs_between_decoding_and_prefill():
    # why READS_Q exists: -log(Q) is a different bias for 4 queries than for 300
    attn = attnc.compile("variant by_q\nscore = score - log(Q)\nnorm = sigmoid\n")
    r = decode_matches_prefill(attn, (2, 4, 2, 4, 300, 16, 16))
    assert not r["ok"] and r["spec_err"] > 1e-3


def test_params_declared_per_query_are_cut_to_the_last_rows():
    # a per-query-row bias, q_idx being the row: the decoding call gets the bias of the rows it computes
    attn = attnc.compile("variant rows\nparam bias: f32[Q]\n"
                         "let q_pos = q_idx + KV - Q\nmask = q_pos >= kv_idx\nscore = score + bias[q_idx]\n")
    r = decode_matches_prefill(attn, (2, 4, 2, 3, 150, 16, 16))
    assert r["ok"], r


def test_document_decoding_reads_ids_per_key_position():
    attn = compiled("document")
    L, n = 90, 4
    g = generator(3)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    doc = torch.tensor([0] * 40 + [1] * 30 + [2] * 20, dtype=torch.int32)
    full = attn(q, k, v, doc=doc)
    step = attn(q[:, :, -n:], k, v, doc=doc)
    assert torch.allclose(step, full[:, :, -n:], atol=1e-6)
    # the last query (document 2) sees exactly keys 70..89
    one = attn(q[:, :, -1:], k, v, doc=doc)
    ref = torch.softmax(q[:, :, -1:] @ k[:, :, 70:].transpose(-1, -2) / 4.0, -1) @ v[:, :, 70:]
    assert torch.allclose(one, ref, atol=1e-6)
