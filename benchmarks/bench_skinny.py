"""Rank-r GEMMs of the fused LoRA node: cuBLAS (torch.mm) vs a Triton kernel, on the 1.1B model's shapes.

A LoRA step's small GEMMs are memory-bound: the down-projection h = x A^T (N, in) @ (in, r) reads x, the
up-projection z = s h B^T (N, r) @ (r, out) writes z. The trace of the H200 step shows cuBLAS at 1.7-2.6 TB/s on
them (of ~4.8); this measures whether a plain Triton kernel streams them faster, per shape, and its host (launch)
time, before anything is wired into the library.

    python benchmarks/bench_skinny.py --device cuda          # H200: ~1 min incl. autotuning
    python benchmarks/bench_skinny.py --dora                 # DoRA's magnitude gradient and one fused DoRA Linear
                                                             # per LORAKIT_DORA_TRITON mode: device and host time
    TRITON_INTERPRET=1 python benchmarks/bench_skinny.py --check-only   # CPU: correctness of the kernels only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl

_DOWN_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [
        (32, 256, 4, 4),
        (64, 128, 4, 4),
        (64, 256, 4, 3),
        (64, 256, 8, 4),
        (128, 128, 8, 4),
        (32, 512, 8, 3),
        (16, 512, 4, 4),
    ]
]


@triton.autotune(configs=_DOWN_CONFIGS, key=["M", "K"])
@triton.jit
def down_kernel(
    x_ptr, w_ptr, h_ptr, M, K, stride_xm, stride_wk, stride_wr, alpha,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h (M, R) = alpha * x (M, K) @ w (K, R); one program per BLOCK_M rows, streaming K."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + rows + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_r[None, :] * stride_wr, mask=kk[:, None] < K, other=0.0)
        acc += tl.dot(x, w)
    out = (acc * alpha).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offs_m[:, None] * R + offs_r[None, :], out, mask=offs_m[:, None] < M)


_UP_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
    for bm, bn, w in [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 256, 8), (32, 256, 4)]
]


@triton.autotune(configs=_UP_CONFIGS, key=["M", "N"])
@triton.jit
def up_kernel(
    h_ptr, b_ptr, z_ptr, M, N, stride_bn, stride_br, alpha,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """z (M, N) = alpha * h (M, R) @ b^T, b (N, R) with any strides."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    h = tl.load(h_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], mask=offs_m[:, None] < M, other=0.0)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br, mask=offs_n[None, :] < N, other=0.0)
    z = (tl.dot(h, b) * alpha).to(z_ptr.dtype.element_ty)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], z, mask=mask)


FIXED: dict | None = None  # --check-only: fixed block sizes, no autotuning (the CPU interpreter has no timer)


def _launch(kernel, grid, *args, **meta) -> None:
    if FIXED is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **FIXED[kernel.fn.__name__])


def down(x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """x (M, K) contiguous, w (K, R) any strides -> (M, R) in x's dtype."""
    m, k = x.shape
    r = w.shape[1]
    h = torch.empty(m, r, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _launch(down_kernel, grid, x, w, h, m, k, x.stride(0), w.stride(0), w.stride(1), alpha, R=r)
    return h


def up(h: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """h (M, R) contiguous, b (N, R) any strides -> (M, N) = alpha h b^T in h's dtype."""
    m, r = h.shape
    n = b.shape[0]
    z = torch.empty(m, n, device=h.device, dtype=h.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _launch(up_kernel, grid, h, b, z, m, n, b.stride(0), b.stride(1), alpha, R=r)
    return z


def device_us(fn, device: str, reps: int) -> float:
    """Median device time per call (CUDA events over ``reps`` back-to-back calls, 5 rounds)."""
    fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6
    rounds = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(begin.elapsed_time(end) / reps * 1e3)
    return statistics.median(rounds)


def host_us(fn, device: str, reps: int) -> float:
    """Host time to issue one call (no sync inside the loop)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps * 1e6
    if device == "cuda":
        torch.cuda.synchronize()
    return host


def check(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
    """Both kernels against float32 products (A^T and B^T as strided views, as the LoRA node passes them)."""
    want = 0.5 * (x.float() @ a.float().t())
    torch.testing.assert_close(down(x, a.t(), 0.5).float(), want, rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(up(h, b, 0.5).float(), 0.5 * (h.float() @ b.float().t()), rtol=2e-2, atol=1e-1)


def cases(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> dict:
    """name -> (cuBLAS call, Triton call): x (N, d), A (r, d), h (N, r), B (d, r)."""
    return {
        "down x A^T": (lambda: x @ a.t(), lambda: down(x, a.t())),
        "down g B": (lambda: x @ b, lambda: down(x, b)),
        "up h B^T": (lambda: h @ b.t(), lambda: up(h, b)),
    }


def dora_costs(dev: str, n: int, r: int, reps: int) -> None:
    """The magnitude gradient (torch ops vs the Triton kernel) and a whole fused DoRA Linear fwd + bwd per mode."""
    from lorakit.kernels import dora_triton
    from lorakit.kernels.dora_linear import fused_dora_linear

    g = torch.Generator().manual_seed(1)
    print("| step | width | mode | device us | host us |")
    print("| --- | --- | --- | --- | --- |")
    for d in (512, 2048, 5632):
        grad = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
        y = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
        inv = torch.rand(d, generator=g).to(dev)
        calls = {
            "torch": lambda grad=grad, y=y, inv=inv: (grad * y).sum(0, dtype=torch.float32).mul_(inv),
            "triton": lambda grad=grad, y=y, inv=inv: dora_triton.triton_magnitude_grad(grad, y, None, inv, False),
        }
        for mode, fn in calls.items():
            print(f"| dm | {d} | {mode} | {device_us(fn, dev, reps):.1f} | {host_us(fn, dev, reps):.1f} |", flush=True)
    x = torch.randn(n, 2048, generator=g).to(dev, torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(2048, 2048, generator=g) / 45).to(dev, torch.bfloat16)
    a = (torch.randn(r, 2048, generator=g) / 45).to(dev).requires_grad_(True)
    b = (torch.randn(2048, r, generator=g) / 45).to(dev).requires_grad_(True)
    m = torch.rand(2048, generator=g).add(0.5).to(dev).requires_grad_(True)
    cot = torch.randn(n, 2048, generator=g).to(dev, torch.bfloat16)

    def layer() -> None:
        out = fused_dora_linear(x, weight, None, a, b, m, 2.0)
        torch.autograd.backward(out, cot)
        x.grad = a.grad = b.grad = m.grad = None

    for mode in dora_triton.MODES:
        dora_triton.MODE = mode
        cells = f"{device_us(layer, dev, reps):.1f} | {host_us(layer, dev, reps):.1f}"
        print(f"| DoRA Linear fwd+bwd | 2048 | {mode} | {cells} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--dora", action="store_true", help="DoRA's small steps instead of the rank-r GEMMs")
    args = parser.parse_args()
    dev, dtype, n, r = args.device, torch.bfloat16, args.tokens, args.rank
    if args.check_only:
        global FIXED
        n, dtype = 96, torch.float32  # the interpreter computes bfloat16 wrongly (numpy has none)
        FIXED = {"down_kernel": dict(BLOCK_M=32, BLOCK_K=32), "up_kernel": dict(BLOCK_M=32, BLOCK_N=32)}
    if args.dora:
        return dora_costs(dev, n, r, args.reps)
    g = torch.Generator().manual_seed(0)
    dims = [512, 2048, 5632] if not args.check_only else [40, 72]
    print(f"device={dev} tokens={n} r={r} dtype={dtype} torch={torch.__version__} triton={triton.__version__}")
    print("| op | width | cuBLAS us | Triton us | cuBLAS TB/s | Triton TB/s | host us torch / triton |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d in dims:
        x = torch.randn(n, d, generator=g).to(device=dev, dtype=dtype)
        a = torch.randn(r, d, generator=g).to(device=dev, dtype=dtype)  # A (r, in): A^T is a strided view
        h = torch.randn(n, r, generator=g).to(device=dev, dtype=dtype)
        b = torch.randn(d, r, generator=g).to(device=dev, dtype=dtype)  # B (out, r)
        check(x, a, h, b)
        if args.check_only:
            continue
        for name, (ref, new) in cases(x, a, h, b).items():
            t_ref, t_new = device_us(ref, dev, args.reps), device_us(new, dev, args.reps)
            hr, hn = host_us(ref, dev, args.reps), host_us(new, dev, args.reps)
            nbytes = n * d * 2
            print(
                f"| {name} | {d} | {t_ref:.1f} | {t_new:.1f} | {nbytes / t_ref / 1e6:.2f} | {nbytes / t_new / 1e6:.2f} "
                f"| {hr:.1f} / {hn:.1f} |",
                flush=True,
            )
    print("kernels agree with float32 references")


if __name__ == "__main__":
    main()
