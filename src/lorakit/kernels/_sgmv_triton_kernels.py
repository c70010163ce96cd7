"""Triton kernels for gathered LoRA (imported only by ``sgmv_triton`` when Triton is present).

shrink: h[row, t] = x[row, t] A[slot[row]]^T      (rank-r projection; split-K with atomics for short rows)
expand: z[row, t] = h[row, t] B[slot[row]]^T (+ bias)
Each program reads its adapter straight from the stack: no gathered copy of the weights.
"""

import triton
import triton.language as tl


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, slot_ptr, h_ptr, L, K,
    stride_xb, stride_xl, stride_as, stride_ar, stride_hb, stride_hl,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_kb = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xb
    a_slot = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k_iter in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        offs_k = (k_iter * SPLIT_K + pid_k) * BLOCK_K + offs_kb
        x_tile = tl.load(
            x_row + offs_m[:, None] * stride_xl + offs_k[None, :],
            mask=(offs_m[:, None] < L) & (offs_k[None, :] < K),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        a_tile = tl.load(a_slot + offs_r[None, :] * stride_ar + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)
        acc += tl.dot(x_tile, a_tile)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, R)
    h_ptrs = h_ptr + row.to(tl.int64) * stride_hb + offs_m[:, None] * stride_hl + offs_r[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=offs_m[:, None] < L)
    else:
        tl.atomic_add(h_ptrs, acc, mask=offs_m[:, None] < L)


@triton.jit
def expand_kernel(
    h_ptr, b_ptr, slot_ptr, bias_ptr, z_ptr, L, N,
    stride_hb, stride_hl, stride_bs, stride_bn, stride_zb, stride_zl,
    HAS_BIAS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    h_tile = tl.load(
        h_ptr + row.to(tl.int64) * stride_hb + offs_m[:, None] * stride_hl + offs_r[None, :],
        mask=offs_m[:, None] < L,
        other=0.0,
    )  # (BLOCK_M, R) float32
    b_tile = tl.load(
        b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None], mask=offs_n[None, :] < N, other=0.0
    )  # (R, BLOCK_N)
    acc = tl.dot(h_tile.to(b_tile.dtype), b_tile)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    z_ptrs = z_ptr + row.to(tl.int64) * stride_zb + offs_m[:, None] * stride_zl + offs_n[None, :]
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_n[None, :] < N))
