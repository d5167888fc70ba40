"""What the torch backend's kernels call for a pass of plain softmax attention (torch_backend.sdpa_pass):
SDPA's fused CPU kernel over spans of key tiles, the mask of a partial span as an additive bias, and the
merge of the spans' results through their log-sum-exp. A kernel receives a Spans as `spans`.

Shapes follow the kernels: a query tile is [B, HKV, GROUP, rows, D] (the query heads of a kv head stacked),
keys and values [B, HKV, cols, D]; SDPA sees the tile as [B, HKV, GROUP * rows, D]."""
from __future__ import annotations

import math

import torch

# SDPA's fused CPU kernel: flash attention that also returns each row's log-sum-exp (None where absent)
HAS_SDPA = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu if HAS_SDPA else None
SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward if HAS_SDPA else None


def fused_here(q, v):
    """SDPA's kernel is there and takes these: CPU tensors, q's head dim equal to v's."""
    return SDPA is not None and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def kept_keys(keep, start_n, end_n):
    """The keys of start_n:end_n that the mask keeps for some row, as a narrower range, and the mask over it
    (None where it keeps every pair); start_n == end_n where it keeps nothing."""
    if keep.shape[-1] > 1:
        cols = keep.reshape(-1, keep.shape[-1]).any(0).nonzero()
        if not len(cols):
            return start_n, start_n, None
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        start_n, end_n, keep = start_n + lo, start_n + hi, keep[..., lo:hi]
    elif not keep.any():
        return start_n, start_n, None
    return start_n, end_n, None if keep.all() else keep


def blocks(q_t, start_n, end_n, keep, block):
    """(r0, r1, start_n, end_n, keep) for each block of rows of a query tile that keeps a key of the span:
    the whole tile for a full span, blocks of `block` rows over the keys they keep for a partial one."""
    rows = q_t.shape[3]
    if keep is None:
        return [(0, rows, start_n, end_n, None)]
    keep = torch.as_tensor(keep)
    keep = keep.view((1,) * (5 - keep.dim()) + tuple(keep.shape))
    out = []
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        a, b, kept = kept_keys(keep[..., r0:r1, :] if keep.shape[3] > 1 else keep, start_n, end_n)
        if a < b:
            out.append((r0, r1, a, b, kept))
    return out


def bias(keep, q, k):
    """The mask in SDPA's layout [B | 1, HKV | 1, GROUP * rows, cols] as an additive bias (0 where kept, -inf
    where dropped), and which rows keep any key: SDPA's kernel reports lse 0 for the others."""
    if keep is None:
        return None, None
    B, HKV, GROUP, rows, _ = q.shape
    b, h = keep.shape[0], keep.shape[1]                 # 1 where the mask reads no batch or head index
    keep = keep.expand(b, h, GROUP, rows, k.shape[2]).reshape(b, h, GROUP * rows, k.shape[2])
    return torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, -math.inf), keep.any(-1)


def attend(q, k, v, keep):
    """Softmax attention of query rows q [B, HKV, GROUP, rows, D] over keys k, v [B, HKV, cols, D]: (out, lse)
    over these keys alone, lse -inf for rows that keep none."""
    B, HKV, GROUP, rows, _ = q.shape
    flat = q.reshape(B, HKV, GROUP * rows, -1)
    mask, kept = bias(keep, q, k)
    if fused_here(flat, v):
        out, lse = SDPA(flat, k, v, attn_mask=mask, scale=1.0)
    else:                                               # another device: the same by plain operations
        s = flat @ k.transpose(-1, -2) if mask is None else (flat @ k.transpose(-1, -2)).add_(mask)
        lse = torch.logsumexp(s, -1)
        out = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None]) @ v
    if kept is not None:
        lse = lse.masked_fill(~kept, -math.inf)
    return out.reshape(B, HKV, GROUP, rows, -1), lse.reshape(B, HKV, GROUP, rows, 1)


def softmax_span(q_t, k_all, v_all, start_n, end_n, keep, width, block):
    """(out, lse) of a query tile over the keys start_n:end_n alone; None where the span keeps no pair."""
    parts = [(r0, r1, attend(q_t[:, :, :, r0:r1], k_all[:, :, a:b], v_all[:, :, a:b], kept))
             for r0, r1, a, b, kept in blocks(q_t, start_n, end_n, keep, block)]
    if not parts:
        return None
    if len(parts) == 1 and parts[0][:2] == (0, q_t.shape[3]):
        return parts[0][2]
    out = q_t.new_zeros(q_t.shape[:4] + (width,))
    lse = q_t.new_full(q_t.shape[:4] + (1,), -math.inf)
    for r0, r1, (o, l) in parts:
        out[:, :, :, r0:r1], lse[:, :, :, r0:r1] = o, l
    return out, lse


def merge_spans(parts, rows_like, width):
    """A query tile's states (m, l, acc) from its spans' (out, lse): m the largest lse, l the sum of
    exp(lse - m), acc the sum of out * exp(lse - m); so l = sum exp(s - m) and acc / l is softmax attention
    over every key of the spans. A row that keeps no key has m = -inf, l = 0, acc = 0."""
    if not parts:
        return (torch.full_like(rows_like, -math.inf), torch.zeros_like(rows_like),
                rows_like.new_zeros(rows_like.shape[:-1] + (width,)))
    if len(parts) == 1:
        out, lse = parts[0]
        return lse, (lse > -math.inf).to(lse.dtype), out
    m = parts[0][1]
    for _, lse in parts[1:]:
        m = torch.maximum(m, lse)
    ref = torch.where(m == -math.inf, 0.0, m)
    l = acc = None
    for out, lse in parts:                              # each span's out and lse are its own: overwritten
        w = lse.sub_(ref).exp_()
        l = w if l is None else l.add_(w)
        acc = out.mul_(w) if acc is None else acc.add_(out.mul_(w))
    return m, l, acc


def softmax_span_grad(dq, dk_all, dv_all, do_t, q_t, o_t, lse_t, k_all, v_all, start_n, end_n, keep, block):
    """Adds the gradients of softmax attention restricted to the keys start_n:end_n into dq (the tile's) and
    dk_all, dv_all (the keys'), given each row's lse over all its keys (+inf for a row that keeps none)."""
    for r0, r1, a, b, kept in blocks(q_t, start_n, end_n, keep, block):
        q, do, o, lse = (x[:, :, :, r0:r1] for x in (q_t, do_t, o_t, lse_t))
        k, v = k_all[:, :, a:b], v_all[:, :, a:b]
        B, HKV, GROUP, rows, _ = q.shape
        flat = lambda x: x.reshape(B, HKV, GROUP * rows, -1)
        mask = bias(kept, q, k)[0]
        if fused_here(q, v):
            dq_b, dk_b, dv_b = SDPA_BACKWARD(flat(do), flat(q), k, v, flat(o), flat(lse)[..., 0], 0.0, False,
                                             attn_mask=mask, scale=1.0)
        else:
            s = flat(q) @ k.transpose(-1, -2) if mask is None else (flat(q) @ k.transpose(-1, -2)).add_(mask)
            p = torch.exp(s - flat(lse))
            ds = p * ((flat(do) @ v.transpose(-1, -2)) - (flat(do) * flat(o)).sum(-1, keepdim=True))
            dq_b, dk_b, dv_b = ds @ k, ds.transpose(-1, -2) @ flat(q), p.transpose(-1, -2) @ flat(do)
        dq[:, :, :, r0:r1] += dq_b.reshape(B, HKV, GROUP, rows, -1)
        dk_all[:, :, a:b] += dk_b
        dv_all[:, :, a:b] += dv_b


class Spans:
    """What a fused kernel calls: the functions above, partial spans attended by blocks of `block` rows."""

    def __init__(self, block: int):
        self.block = block

    def softmax_span(self, q_t, k_all, v_all, start_n, end_n, keep, width):
        return softmax_span(q_t, k_all, v_all, start_n, end_n, keep, width, self.block)

    def softmax_span_grad(self, dq, dk_all, dv_all, do_t, q_t, o_t, lse_t, k_all, v_all, start_n, end_n, keep):
        softmax_span_grad(dq, dk_all, dv_all, do_t, q_t, o_t, lse_t, k_all, v_all, start_n, end_n, keep, self.block)

    merge_spans = staticmethod(merge_spans)
