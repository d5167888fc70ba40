"""FlexAttention-style callbacks with attnc: ALiBi and document masking.

Each variant is written twice, as Python callbacks and as an `.attn` file, and
the two compile to the same IR and give the same output.

    python examples/callbacks.py
"""
from pathlib import Path

import torch

import attnc

EXAMPLES = Path(__file__).resolve().parent
B, H, S, D = 2, 4, 100, 32


def alibi_example(q, k, v):
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=q.device) / H)  # m_h = 2^(-8(h+1)/H)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    # `slopes` is a closed-over tensor: attnc turns it into a param and binds it itself
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    attn = attnc.compile(score_mod=alibi, mask_mod=causal)
    out = attn(q, k, v)
    print(attn.ir())

    from_file = attnc.compile(str(EXAMPLES / "alibi.attn"))
    assert attn.ir() == from_file.ir()
    diff = (out - from_file(q, k, v, slopes=slopes)).abs().max().item()
    print(f"alibi: max |callbacks - alibi.attn| = {diff:.3e}")


def document_example(q, k, v):
    # three packed documents of 30, 45 and 25 tokens
    lengths = torch.tensor([30, 45, 25], device=q.device)
    doc = torch.repeat_interleave(torch.arange(3, device=q.device), lengths).to(torch.int32)

    # `&`, not `and`: the callback is traced, and `and` would ask for a Python bool
    def document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    attn = attnc.compile(mask_mod=document)
    out = attn(q, k, v)

    from_file = attnc.compile(str(EXAMPLES / "document.attn"))
    diff = (out - from_file(q, k, v, doc=doc)).abs().max().item()
    print(f"document: max |callbacks - document.attn| = {diff:.3e}")


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA -> Triton, CPU -> torch backend
    q, k, v = (torch.randn(B, H, S, D, device=device) for _ in range(3))
    alibi_example(q, k, v)
    document_example(q, k, v)


if __name__ == "__main__":
    main()
