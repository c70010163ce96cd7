"""Extra tiny models for the core suites (injection, targeting, layers, parity); see also models.py."""

from __future__ import annotations

import torch
import torch.nn as nn


def tiny_gpt2_layers(seed: int = 0, layers: int = 3):
    """GPT-2 with three blocks, for layer filters that pick a subset of more than two layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


class NormNet(nn.Module):
    """A model with a LayerNorm, a type LoRA does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


class Scaler(nn.Module):
    """A custom layer with a weight (out, in) but not an nn.Linear; used to test registering a layer type."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim)
        self.in_features = self.out_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * (x @ self.weight.T)


class ScalerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scaler = Scaler(8)
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.scaler(x))
