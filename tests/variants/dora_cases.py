"""DoRA test cases: (model, target modules) per layer type, built identically for peft and lorakit."""

from __future__ import annotations

import torch

from models import BUILDERS, make_inputs


def gpt2_no_dropout(seed: int = 0):
    """Tiny GPT-2 (transformers Conv1D layers) without dropout, so that train-mode runs are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config).eval()


BUILD = {**BUILDERS, "gpt2": gpt2_no_dropout}

# name -> (model kind, target modules); every DoRA layer type: Linear, Conv1D, Embedding, Conv1d/2d/3d
LAYER_CASES: dict[str, tuple[str, list[str]]] = {
    "linear": ("mlp", ["lin0", "lin1", "head"]),
    "conv1d_transformers": ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    "embedding": ("emb", ["emb", "lin"]),
    "conv": ("conv", ["conv1d", "conv2d", "conv3d"]),
    "llama": ("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
}


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    return BUILD[kind](seed)


def inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    return make_inputs(kind, seed)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every trainable tensor away from its init (as training would), magnitudes included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def scalar_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per output element (a plain sum would hide a transposed gradient)."""
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float32).reshape(out.shape)
    return (out.float() * weights).sum() + out.float().pow(2).mean()
