"""Layer micro-benchmark: one d x d Linear with LoRA rank r on T tokens, forward + backward (grads to the input and
the adapter), against the frozen layer's forward + backward to the input. Each library wraps its own copy of the
same layer; adapter weights are copied from peft's into lorakit's."""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import Row, adapter_state, load_adapter_state, lora_kwargs, time_ms


class _One(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _wrapped(linear: nn.Linear, rank: int):
    import peft

    import lorakit

    kwargs = {**lora_kwargs(), "r": rank, "lora_alpha": 2 * rank, "target_modules": ["proj"]}
    torch.manual_seed(5)
    p_model = peft.get_peft_model(_One(_copy(linear)), peft.LoraConfig(**kwargs))
    l_model = lorakit.get_peft_model(_One(_copy(linear)), lorakit.LoraConfig(**kwargs))
    load_adapter_state(l_model, adapter_state(p_model))
    return p_model.train(), l_model.train()


def _copy(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
    out.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    return out


def _fwd_bwd(model, x: torch.Tensor, grad: torch.Tensor):
    def step():
        model(x).backward(grad)

    return step


def run(base, profile: dict, device: torch.device, log) -> tuple[list[Row], object]:
    d, dtype = profile["layer_d"], profile["dtype"]
    torch.manual_seed(6)
    linear = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    rows = []
    for tokens in profile["layer_tokens"]:
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d, device=device, dtype=dtype)
        base_ms = time_ms(_fwd_bwd(_One(linear), x, grad), device, profile["steps"] * 2, profile["warmup"])
        for rank in profile["layer_ranks"]:
            p_model, l_model = _wrapped(linear, rank)
            p_ms = time_ms(_fwd_bwd(p_model, x, grad), device, profile["steps"] * 2, profile["warmup"])
            l_ms = time_ms(_fwd_bwd(l_model, x, grad), device, profile["steps"] * 2, profile["warmup"])
            log(f"layer d={d} T={tokens} r={rank}: base {base_ms:.2f} peft {p_ms:.2f} lorakit {l_ms:.2f} ms")
            rows.append(Row("layer", f"d={d}, r={rank}, T={tokens}: fwd + bwd", base_ms, p_ms, l_ms))
    return rows, base
