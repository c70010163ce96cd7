"""Pick the fused node's weight-gradient split (``lora_linear.WGRAD_CHUNKS``) on this device: time the fused LoRA
Linear's forward + backward on the profile's token count and layer widths for each candidate, keep the fastest."""

from __future__ import annotations

import torch

import lorakit.kernels.lora_linear as lora_linear

from .common import RANK, time_ms

CANDIDATES = (1, 4, 8, 16)


def _case(tokens: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype):
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
    lora_a = torch.randn(RANK, d_in, device=device, requires_grad=True)
    lora_b = torch.randn(d_out, RANK, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

    def step():
        lora_linear.fused_lora_linear(x, weight, None, lora_a, lora_b, 2.0).backward(grad)

    return step


def run(profile: dict, device: torch.device, log) -> int:
    tokens = profile["train_batch"] * profile["train_seq"]
    shapes = [(profile["hidden"], profile["hidden"]), (profile["hidden"], profile["intermediate"])]
    shapes.append((profile["intermediate"], profile["hidden"]))
    steps = [_case(tokens, d_in, d_out, device, profile["dtype"]) for d_in, d_out in shapes]
    best, best_ms = lora_linear.WGRAD_CHUNKS, None
    for chunks in CANDIDATES:
        lora_linear.WGRAD_CHUNKS = chunks
        ms = sum(time_ms(step, device, 20, 3) for step in steps)
        log(f"tune: WGRAD_CHUNKS={chunks}: {ms:.3f} ms for {len(shapes)} fused layers fwd + bwd on {tokens} tokens")
        if best_ms is None or ms < best_ms:
            best, best_ms = chunks, ms
    lora_linear.WGRAD_CHUNKS = best
    log(f"tune: using WGRAD_CHUNKS={best}")
    return best
