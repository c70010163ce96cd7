"""Tiny mixture-of-experts models for the target_parameters tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


class TinyExperts(nn.Module):
    """Expert weights as 3-D parameters used by einsum, as transformers' MoE experts: (E, out, in), or (E, in, out)
    with ``is_transposed = True`` (GPT-OSS style)."""

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 5, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        up, down = (experts, 2 * hidden, dim), (experts, dim, hidden)
        if transposed:
            up, down = (experts, dim, 2 * hidden), (experts, hidden, dim)
        self.gate_up_proj = nn.Parameter(torch.randn(up) / dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(down) / hidden**0.5)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (N, dim); weights: (N, E) routing probabilities -> (N, dim)."""
        up_eq, down_eq = ("nd,edo->neo", "neh,ehd->ned") if self.is_transposed else ("nd,eod->neo", "neh,edh->ned")
        gate, up = torch.einsum(up_eq, x, self.gate_up_proj).chunk(2, dim=-1)  # (N, E, hidden) each
        out = torch.einsum(down_eq, F.silu(gate) * up, self.down_proj)  # (N, E, dim)
        return (out * weights.unsqueeze(-1)).sum(1)


class TinyMoE(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(6, 3)
        self.experts = TinyExperts(transposed=transposed)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.experts(x, self.router(x).softmax(-1)))


def tiny_moe(seed: int = 0, transposed: bool = False) -> TinyMoE:
    torch.manual_seed(seed)
    return TinyMoE(transposed).eval()


def tiny_qwen3_moe(seed: int = 0):
    """Two-layer Qwen3-MoE (4 experts, top-2) from transformers, experts stored (E, out, in)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return Qwen3MoeForCausalLM(config).eval()


# case -> (builder, inputs, config kwargs)
CASES = {
    "einsum": (lambda: tiny_moe(), lambda: torch.randn(7, 6), dict(target_parameters=[*EXPERT_TARGETS, "lin.weight"])),
    "einsum_transposed": (
        lambda: tiny_moe(transposed=True),
        lambda: torch.randn(7, 6),
        dict(target_parameters=EXPERT_TARGETS, r=3, lora_alpha=5),
    ),
    "qwen3_moe": (
        tiny_qwen3_moe,
        lambda: torch.randint(0, 64, (2, 6)),
        dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=2),
    ),
}


def output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out
