"""The yardstick: a plain FlashAttention-2 forward in Triton, as the fused-attention tutorial writes it.

Full tiles only (the sequence length must be a multiple of both block sizes), K and V pointer tiles built
once and moved by a scalar offset advanced each iteration, no bounds masks, exp2 with log2(e) folded into
the scale. Non-causal, or causal with the
tiles left of the diagonal unmasked and only the diagonal band masked. benchmarks/sass.py compiles it
beside attnc's kernels; it is never part of attnc.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _fa2_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, qk_scale, lo, hi, offs_m, offs_n,
                   BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr):
    """Key tiles [lo, hi) into the running (acc, l_i, m_i); DIAGONAL masks keys after the query."""
    # a scalar offset, not `k_ptrs += ...` on the pointer tiles: on sm_90 that kept more registers live
    # (triton 3.9: 220 instead of 208 non-causal, and causal spilled)
    k_base = lo * stride_kn
    v_base = lo * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        # -- compute qk --
        k = tl.load(k_ptrs + k_base)
        qk = tl.dot(q, k)
        if DIAGONAL:
            causal = offs_m[:, None] >= start_n + offs_n[None, :]
            qk = qk * qk_scale + tl.where(causal, 0.0, -1.0e6)   # finite: exp2 of it is 0, never NaN
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.exp2(qk)
        # -- update m_i and l_i --
        alpha = tl.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update acc --
        v = tl.load(v_ptrs + v_base)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def fa2_fwd_kernel(Q, K, V, sm_scale, Out, Lse,
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_oz, stride_oh, stride_om, stride_ok,
                   H, N_CTX,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    q_offset = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_offset = off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    v_offset = off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    o_offset = off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_offset + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk)
    k_ptrs = K + k_offset + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kk     # K^T tiles
    v_ptrs = V + v_offset + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E    # log2(e) folded in: scores and m_i in base 2
    if CAUSAL:
        # tiles wholly left of the diagonal need no mask; the diagonal band does
        diag = start_m * BLOCK_M
        acc, l_i, m_i = _fa2_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, qk_scale,
                                       0, diag, offs_m, offs_n, BLOCK_N, False)
        acc, l_i, m_i = _fa2_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, qk_scale,
                                       diag, diag + BLOCK_M, offs_m, offs_n, BLOCK_N, True)
    else:
        acc, l_i, m_i = _fa2_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, qk_scale,
                                       0, N_CTX, offs_m, offs_n, BLOCK_N, False)
    # epilogue
    tl.store(Lse + off_hz.to(tl.int64) * N_CTX + offs_m, m_i + tl.log2(l_i))    # base 2, as the tutorial keeps it
    acc = acc / l_i[:, None]
    tl.store(Out + o_offset + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok, acc.to(Out.dtype.element_ty))


def attention(q, k, v, causal: bool = False, sm_scale: float | None = None, BLOCK_M: int = 128, BLOCK_N: int = 64,
              num_warps: int = 4, num_stages: int = 3):
    """(out, lse in base 2) for q, k, v [B, H, N, D] of one dtype, N a multiple of both block sizes."""
    B, H, N, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if N % BLOCK_M or N % BLOCK_N or BLOCK_M % BLOCK_N:
        raise ValueError(f"full tiles only: N={N} must be a multiple of BLOCK_M={BLOCK_M} and BLOCK_N={BLOCK_N}, "
                         "and BLOCK_M of BLOCK_N")
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    grid = (N // BLOCK_M, B * H)
    fa2_fwd_kernel[grid](q, k, v, sm_scale, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, N,
                         HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal,
                         num_warps=num_warps, num_stages=num_stages)
    return out, lse
