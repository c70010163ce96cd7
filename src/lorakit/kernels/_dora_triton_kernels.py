"""Triton kernels for the fused DoRA Linear (imported only by ``dora_triton`` when Triton is present).

factors: from W A^T, B, A A^T, ||W||^2 and m, per output row o (all float32):
    T_o = (W A^T)_o + (s/2) (B G)_o,  n_o^2 = ||W_o||^2 + 2 s <B_o, T_o>,  k_o = m_o / n_o + floor
    writes k, s k, 1 / (k n) and B' = s k B (activation dtype): the dozen small ops of the torch path in one launch
colsum: per output column o and token chunk c, inv_o * sum_{n in c} g_no (y_no - b_o) (and sum_{n in c} g_no):
    the magnitude's gradient (summed over chunks afterwards) in one read of g and y, no (N, out) product written
"""

import triton
import triton.language as tl


@triton.jit
def factors_kernel(
    wa_ptr, b_ptr, gram_ptr, wsq_ptr, m_ptr, kb_ptr, kvec_ptr, OUT, RANK, scaling, floor,
    RP: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, RP)
    mask_o = offs_o < OUT
    mask_r = offs_r < RANK
    mask = mask_o[:, None] & mask_r[None, :]
    tile = offs_o[:, None] * RANK + offs_r[None, :]
    b = tl.load(b_ptr + tile, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_O, RP)
    wa = tl.load(wa_ptr + tile, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_O, RP)
    # B G (BLOCK_O, RP) as RP rank-1 updates in plain float32 FMAs: written as sum(b[:, :, None] * gram[None], 1)
    # the compiler turns it into a TF32 dot on GPUs (k off by ~3e-4)
    bg = tl.zeros((BLOCK_O, RP), dtype=tl.float32)
    for i in tl.static_range(RP):
        in_rank = (offs_o * 0 + i) < RANK  # (BLOCK_O,): i is a real rank index (not padding)
        b_i = tl.load(b_ptr + offs_o * RANK + i, mask=mask_o & in_rank, other=0.0).to(tl.float32)  # (BLOCK_O,)
        g_i = tl.load(gram_ptr + i * RANK + offs_r, mask=mask_r & (offs_r * 0 + i < RANK), other=0.0)  # G's row i
        bg += b_i[:, None] * g_i[None, :]
    t = wa + (0.5 * scaling) * bg
    n2 = tl.load(wsq_ptr + offs_o, mask=mask_o, other=1.0) + (2.0 * scaling) * tl.sum(b * t, axis=1)
    rn = 1.0 / tl.sqrt(n2)
    m = tl.load(m_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    k = m * rn + floor
    ks = k * scaling
    tl.store(kvec_ptr + offs_o, k, mask=mask_o)
    tl.store(kvec_ptr + OUT + offs_o, ks, mask=mask_o)
    tl.store(kvec_ptr + 2 * OUT + offs_o, rn / k, mask=mask_o)
    tl.store(kb_ptr + tile, (b * ks[:, None]).to(kb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def colsum_kernel(
    g_ptr, y_ptr, bias_ptr, inv_ptr, part_ptr, N, OUT, rows_per_chunk, stride_g, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OUT
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, N)
    acc_gy = tl.zeros((BLOCK_O,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < stop) & mask_o[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows64 * stride_g + offs_o[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64 * stride_y + offs_o[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_gy += tl.sum(g * y, axis=0)
        if HAS_BIAS:
            acc_g += tl.sum(g, axis=0)
    inv = tl.load(inv_ptr + offs_o, mask=mask_o, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        acc_gy -= bias * acc_g  # sum g (y - b)
        tl.store(part_ptr + (chunks + chunk) * OUT + offs_o, acc_g, mask=mask_o)
    tl.store(part_ptr + chunk * OUT + offs_o, acc_gy * inv, mask=mask_o)
