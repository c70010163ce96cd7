"""Tiny models and helpers for the trainable-tokens tests."""

from __future__ import annotations

import torch

IDS = [1, 5, 7]


def tiny_llama_tokens(seed: int = 0, tied: bool = False):
    """One-layer Llama (vocab 96, hidden 32); ``tied`` shares lm_head.weight with embed_tokens.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def batch(seed: int = 1) -> torch.Tensor:
    """(3, 8) token ids that include every trainable id and some others."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (3, 8), generator=g)
    ids[0, :3] = torch.tensor(IDS)
    ids[1, 5] = IDS[1]
    return ids


def randomise(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor of an adapter state dict (same keys and shapes)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state_dict.items()}
