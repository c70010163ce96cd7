"""Shared helpers of the init-method tests: models, calibration data, and comparisons with peft."""

from __future__ import annotations

import dataclasses
import sys
import types

import torch

from models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


def peft_corda():
    """peft's CorDA module. It imports the optional ``attr`` package for one plain dataclass; without it we provide
    a stand-in that maps ``attr.dataclass`` to ``dataclasses.dataclass`` (same behaviour for that use)."""
    try:
        import attr  # noqa: F401
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora import corda

    return corda


def token_batches(n: int, batch: int = 4, length: int = 16, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Language-model batches with some padding and some masked labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 96, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.clone()
        labels[min(1, batch - 1), :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """module prefix -> (A, B, base weight) from an in-memory state dict (adapter 'default')."""
    out = {}
    for key, a in state.items():
        if key.endswith("lora_A.default.weight"):
            prefix = key[: -len("lora_A.default.weight")]
            out[prefix] = (a, state[prefix + "lora_B.default.weight"], state[prefix + "base_layer.weight"])
    return out


def assert_same_split(ours, theirs, atol: float = 1e-5) -> None:
    """Same B @ A (insensitive to SVD sign flips) and the same residual base weight, layer by layer."""
    mine, ref = lora_pairs(ours.state_dict()), lora_pairs(theirs.state_dict())
    assert mine.keys() == ref.keys() and mine
    for prefix, (a, b, w) in mine.items():
        ra, rb, rw = ref[prefix]
        torch.testing.assert_close(b @ a, rb @ ra, atol=atol, rtol=0, msg=f"B@A of {prefix}")
        torch.testing.assert_close(w, rw, atol=atol, rtol=0, msg=f"base weight of {prefix}")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out
