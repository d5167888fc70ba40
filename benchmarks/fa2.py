"""The yardstick: a plain FlashAttention-2 in Triton, forward and backward, as the fused-attention tutorial
writes it.

Full tiles only (the sequence length must be a multiple of both block sizes), pointer tiles built once and
moved by a scalar offset advanced each iteration, no bounds masks, exp2 with log2(e) folded into the scale.
Non-causal, or causal with the tiles off the diagonal unmasked and only the diagonal band masked. The
backward is three kernels, as attnc's Triton backward is: a row preprocess (delta = rowsum(dO * O)), dQ over
query tiles sweeping key tiles, and dK/dV over key tiles sweeping query tiles. benchmarks/sass.py compiles
it beside attnc's kernels; it is never part of attnc.
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


# -- backward --
@triton.jit
def fa2_bwd_preprocess_kernel(O, DO, Delta, stride_z, stride_h, stride_m, stride_k, H, N_CTX,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), one value per query row."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    offset = (off_hz // H).to(tl.int64) * stride_z + (off_hz % H).to(tl.int64) * stride_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offset + offs_m[:, None] * stride_m + offs_d[None, :] * stride_k
    o = tl.load(O + tile).to(tl.float32)
    do = tl.load(DO + tile).to(tl.float32)
    tl.store(Delta + off_hz.to(tl.int64) * N_CTX + offs_m, tl.sum(o * do, 1))


@triton.jit
def _fa2_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn, qk_scale, lo, hi, offs_m,
                      offs_n, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr):
    """Key tiles [lo, hi) into dq; DIAGONAL masks keys after the query."""
    k_base = lo * stride_kn
    v_base = lo * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kT = tl.load(kT_ptrs + k_base)
        vT = tl.load(vT_ptrs + v_base)
        # -- recompute p from the saved row statistic --
        qk = tl.dot(q, kT)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], p, 0.0)
        # -- dS = P * (dP - delta) --
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    return dq


@triton.jit
def fa2_bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, sm_scale,
                      stride_z, stride_h, stride_m, stride_k, H, N_CTX,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ of one query tile: programs over query tiles, sweeping key tiles."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    offset = (off_hz // H).to(tl.int64) * stride_z + (off_hz % H).to(tl.int64) * stride_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offset + offs_m[:, None] * stride_m + offs_d[None, :] * stride_k
    q = tl.load(Q + rows)
    do = tl.load(DO + rows)
    lse = tl.load(Lse + off_hz.to(tl.int64) * N_CTX + offs_m)         # base 2, as the forward stores it
    delta = tl.load(Delta + off_hz.to(tl.int64) * N_CTX + offs_m)
    kT_ptrs = K + offset + offs_n[None, :] * stride_m + offs_d[:, None] * stride_k
    vT_ptrs = V + offset + offs_n[None, :] * stride_m + offs_d[:, None] * stride_k
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # key tiles wholly left of the diagonal need no mask; the band of key tiles the diagonal crosses does
        diag = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N
        dq = _fa2_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_m, stride_m, qk_scale, 0, diag,
                               offs_m, offs_n, BLOCK_N, False)
        dq = _fa2_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_m, stride_m, qk_scale, diag,
                               (start_m + 1) * BLOCK_M, offs_m, offs_n, BLOCK_N, True)
    else:
        dq = _fa2_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_m, stride_m, qk_scale, 0, N_CTX,
                               offs_m, offs_n, BLOCK_N, False)
    # epilogue: the scale sits in the logit
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def _fa2_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, Lse, Delta, stride_m, qk_scale, lo, hi, offs_n, offs_m,
                        BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr):
    """Query tiles [lo, hi) into dk and dv; DIAGONAL masks queries before the key. Tiles are transposed:
    keys are rows, queries columns."""
    base = lo * stride_m
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        qT = tl.load(qT_ptrs + base)
        lse = tl.load(Lse + rows)
        # -- recompute p^T --
        qkT = tl.dot(k, qT)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if DIAGONAL:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        # -- dV += P^T dO --
        do = tl.load(do_ptrs + base)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        # -- dK += dS^T Q, dS = P * (dP - delta) --
        delta = tl.load(Delta + rows)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
        base += BLOCK_M * stride_m
    return dk, dv


@triton.jit
def fa2_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, sm_scale,
                        stride_z, stride_h, stride_m, stride_k, H, N_CTX,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """dK and dV of one key tile: programs over key tiles, sweeping query tiles."""
    start_n = tl.program_id(0)
    off_hz = tl.program_id(1)
    offset = (off_hz // H).to(tl.int64) * stride_z + (off_hz % H).to(tl.int64) * stride_h
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offset + offs_n[:, None] * stride_m + offs_d[None, :] * stride_k
    k = tl.load(K + rows)
    v = tl.load(V + rows)
    qT_ptrs = Q + offset + offs_m[None, :] * stride_m + offs_d[:, None] * stride_k
    do_ptrs = DO + offset + offs_m[:, None] * stride_m + offs_d[None, :] * stride_k
    Lse += off_hz.to(tl.int64) * N_CTX
    Delta += off_hz.to(tl.int64) * N_CTX
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # the query tiles the diagonal crosses are masked; the tiles after them need no mask
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
        hi = tl.cdiv((start_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M
        dk, dv = _fa2_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, Lse, Delta, stride_m, qk_scale, lo, hi,
                                     offs_n, offs_m, BLOCK_M, True)
        lo = hi
    dk, dv = _fa2_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, Lse, Delta, stride_m, qk_scale, lo, N_CTX,
                                 offs_n, offs_m, BLOCK_M, False)
    # epilogue
    tl.store(DK + rows, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + rows, dv.to(DV.dtype.element_ty))


def attention_backward(q, k, v, out, lse, do, causal: bool = False, sm_scale: float | None = None,
                       BLOCK_M: int = 64, BLOCK_N: int = 32, BLOCK_M1: int | None = None, BLOCK_N1: int | None = None,
                       num_warps: int = 4, num_stages: int = 3):
    """(dq, dk, dv) for attention(q, k, v, causal) with its (out, lse in base 2) and the output's gradient;
    every tensor [B, H, N, D] of one shape and contiguous, N a multiple of every block size. dQ runs on
    BLOCK_M queries stepping BLOCK_N keys, dK/dV on BLOCK_N1 keys stepping BLOCK_M1 queries (by default
    BLOCK_M keys stepping BLOCK_N queries, as the tutorial makes the program tile the larger)."""
    BLOCK_M1 = BLOCK_N if BLOCK_M1 is None else BLOCK_M1
    BLOCK_N1 = BLOCK_M if BLOCK_N1 is None else BLOCK_N1
    B, H, N, D = q.shape
    tensors = (q, k, v, out, do)
    if any(t.shape != q.shape or t.stride() != q.stride() for t in tensors):
        raise ValueError("q, k, v, out and do must have one shape [B, H, N, D] and one layout")
    if any(N % b for b in (BLOCK_M, BLOCK_N, BLOCK_M1, BLOCK_N1)):
        raise ValueError(f"full tiles only: N={N} must be a multiple of every block size "
                         f"({BLOCK_M}, {BLOCK_N}, {BLOCK_M1}, {BLOCK_N1})")
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launch = dict(num_warps=num_warps, num_stages=num_stages)
    fa2_bwd_preprocess_kernel[(N // BLOCK_M, B * H)](out, do, delta, *out.stride(), H, N, HEAD_DIM=D,
                                                     BLOCK_M=BLOCK_M, **launch)
    fa2_bwd_dq_kernel[(N // BLOCK_M, B * H)](q, k, v, do, dq, lse, delta, sm_scale, *q.stride(), H, N, HEAD_DIM=D,
                                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, **launch)
    fa2_bwd_dkdv_kernel[(N // BLOCK_N1, B * H)](q, k, v, do, dk, dv, lse, delta, sm_scale, *q.stride(), H, N,
                                                HEAD_DIM=D, BLOCK_M=BLOCK_M1, BLOCK_N=BLOCK_N1, CAUSAL=causal, **launch)
    return dq, dk, dv
