"""Tiny LoRA expert libraries for the Arrow tests: adapters with chosen singular spectra, saved by peft or lorakit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peft
import torch
import torch.nn as nn

import lorakit
from models import tiny_llama

LLAMA_TARGETS = ("q_proj", "v_proj", "up_proj")
GAPPED = (1.0, 0.35, 0.25, 0.15)
"""sigma_i / sigma_1 of every B A: a clear gap, as trained adapters have, so that peft's 15 power iterations reach
the top singular vector (to ~1e-7) and its routing can be compared with lorakit's exact prototypes."""


def _factors(a_shape, b_shape, generator: torch.Generator, scale: float, spectrum: tuple[float, ...] | None):
    """Random (A (r, in), B (out, r)); with ``spectrum``, B A gets singular values sigma_1 * spectrum."""
    a = torch.randn(a_shape, generator=generator) * scale
    b = torch.randn(b_shape, generator=generator) * scale
    if spectrum is None:
        return a, b
    r = a_shape[0]
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    s = s[0] * torch.tensor([*spectrum, *[spectrum[-1]] * r][:r])  # longer ranks repeat the last ratio
    return s.sqrt()[:, None] * vh[:r], u[:, :r] * s.sqrt()


def save_adapter(
    path: Path,
    seed: int,
    *,
    library: str = "peft",
    r: int = 4,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    scale: float = 0.3,
    spectrum: tuple[float, ...] | None = GAPPED,
    model_fn: Callable[[], nn.Module] = tiny_llama,
) -> str:
    """Save one adapter (alpha = 2 r) on ``model_fn()`` with random factors; returns the folder as a string."""
    lib = peft if library == "peft" else lorakit
    config = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    model = lib.get_peft_model(model_fn(), config)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            new_a, new_b = _factors(a.shape, b.shape, generator, scale, spectrum)
            with torch.no_grad():
                a.copy_(new_a)
                b.copy_(new_b)
    model.save_pretrained(str(path))
    return str(path)
