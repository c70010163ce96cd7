"""Shared builders for the optimizer tests: a lorakit model and a peft model with identical weights."""

from __future__ import annotations

import peft
import torch

import lorakit
from models import BUILDERS, make_inputs, output_tensor


def pair(kind: str, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lorakit model, peft model) of the same config in training mode; ours holds peft's weights."""
    ref = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(init_lora_weights=False, **config))
    ours = lorakit.get_peft_model(BUILDERS[kind](), lorakit.LoraConfig(init_lora_weights=False, **config))
    ours.load_state_dict(ref.state_dict())
    return ours.train(), ref.train()


def loss_of(model: torch.nn.Module, kind: str, seed: int) -> torch.Tensor:
    """A scalar loss whose gradient reaches every adapter: squared logits on random inputs (the base model's own
    dropout draws the same masks in both libraries: same seed, same module order)."""
    torch.manual_seed(seed)
    return output_tensor(model(**make_inputs(kind, seed))).pow(2).mean()


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, steps: int = 3) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(model, kind, seed=step + 1).backward()
        optimizer.step()


def named_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group with its parameters as sorted names instead of tensors (the order within a group follows
    module registration, which differs for DoRA layers and does not change the optimisation)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        entry = {k: v for k, v in group.items() if k not in ("params", "names")}
        entry["params"] = sorted(names[id(p)] for p in group["params"])
        out.append(entry)
    return out


def assert_same_parameters(ours: torch.nn.Module, ref: torch.nn.Module, atol: float = 1e-6) -> None:
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert ours_params.keys() == ref_params.keys()
    for name, param in ours_params.items():
        torch.testing.assert_close(param, ref_params[name], atol=atol, rtol=0, msg=name)
