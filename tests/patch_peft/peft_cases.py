"""Shared set-up for the patch_peft tests: matched peft models (one patched, one not), fast-path counters."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import peft
import torch

import lorakit
from lorakit.patch_peft import forward as patched_forward_module
from models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def peft_model(arch: str = "llama", seed: int = 0, **config) -> peft.PeftModel:
    """A peft model on a tiny llama / GPT-2 (Conv1D) built from config, adapters random (init_lora_weights=False)."""
    base = tiny_llama(seed) if arch == "llama" else tiny_gpt2(seed)
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **config}
    if arch == "gpt2":
        config.setdefault("fan_in_fan_out", True)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, peft.LoraConfig(**config))


def pair(arch: str = "llama", seed: int = 0, **config) -> tuple[peft.PeftModel, peft.PeftModel]:
    """(patched, reference): the same peft model twice, the first patched by lorakit."""
    reference = peft_model(arch, seed, **config)
    patched = copy.deepcopy(reference)
    lorakit.patch_peft(patched)
    return patched, reference


def tokens(batch: int = 3, length: int = 9, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=generator)


class Hits:
    """How many layer calls took lorakit's fused path and its gathered mixed-batch path."""

    def __init__(self) -> None:
        self.fused = 0
        self.mixed = 0


@contextmanager
def count_fast_paths(monkeypatch) -> Iterator[Hits]:
    hits = Hits()
    fused, mixed = patched_forward_module.fused_forward, patched_forward_module.fast_mixed_forward

    def fused_counted(*args, **kwargs):
        out = fused(*args, **kwargs)
        hits.fused += out is not None
        return out

    def mixed_counted(*args, **kwargs):
        out = mixed(*args, **kwargs)
        hits.mixed += out is not None
        return out

    monkeypatch.setattr(patched_forward_module, "fused_forward", fused_counted)
    monkeypatch.setattr(patched_forward_module, "fast_mixed_forward", mixed_counted)
    yield hits


def lora_layer_count(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32, 1e-5 relative (an absolute floor of 1e-6 for entries near zero)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(patched: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = grads(patched), grads(reference)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        assert_close(ours[name], theirs[name])
