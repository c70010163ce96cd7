"""LoRA+ (arXiv:2402.12354): train B with a learning rate ``loraplus_lr_ratio`` times A's.

For width n -> infinity, A and B need learning rates of different orders for feature learning to be efficient; the
paper fixes eta_B = ratio * eta_A. ``create_loraplus_optimizer`` builds PEFT's four parameter groups (same order, same
members, same hyper-parameters):

    0. A factors and any other matrix                    lr,                  weight decay loraplus_weight_decay
    1. embedding LoRA (lora_embedding_A/B)               loraplus_lr_embedding, loraplus_weight_decay
    2. B factors and 1-D parameters that decay           lr * ratio,          loraplus_weight_decay
    3. B factors and 1-D parameters that do not decay    lr * ratio,          0

A parameter decays unless it sits inside an ``nn.LayerNorm`` or its name contains "bias" (transformers' Trainer
rule). Only parameters that require grad are grouped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers.base import LoraLayer

EIGHT_BIT_OPTIMIZERS = frozenset({"Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"})
"""bitsandbytes optimizers whose embedding weights must stay 32-bit (as transformers' Trainer arranges)."""


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: inside an ``nn.LayerNorm`` (at any depth), or named "*bias*"."""
    norm_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) and name)
    return {name for name, _ in model.named_parameters() if "bias" in name or name.startswith(norm_prefixes)}


def _b_factor_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every LoRA layer's ``lora_B`` (weights and lora_bias biases)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
            ids.update(id(p) for p in module.lora_B.parameters())
    return ids


def _lora_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.adapters:
                ids.update(id(p) for p in module.adapter_parameters(name))
    return ids


def _held_by_embedding_layer(model: nn.Module, param_name: str) -> bool:
    """Whether the parameter sits directly in a container of an embedding LoRA layer (``emb.lora_embedding_A.<name>``,
    ``emb.base_layer.weight``): the module two levels above it is that layer. PEFT's rule, so groups agree."""
    holder = param_name.rsplit(".", 2)[0] if param_name.count(".") >= 2 else ""
    if not holder:
        return False
    module = model.get_submodule(holder)
    return isinstance(module, LoraLayer) and module.layer_kind == "embedding"


def loraplus_param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """The four LoRA+ parameter groups of ``model``'s trainable parameters (see the module docstring).

    Raises ValueError for ``loraplus_lr_ratio <= 0`` and for a model without trainable LoRA parameters.
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be > 0 (B's learning rate is lr * ratio; the paper uses ratios >= 1), got "
            f"{loraplus_lr_ratio!r}."
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora_ids = _lora_param_ids(model)
    if not any(id(p) in lora_ids for _, p in trainable):
        raise ValueError(
            f"create_loraplus_optimizer found no trainable LoRA parameters in {type(model).__name__} "
            f"({len(trainable)} trainable parameters in all). Wrap the model with get_peft_model first and make sure "
            "an adapter is active and not in inference mode."
        )
    b_ids, no_decay = _b_factor_ids(model), no_decay_names(model)
    groups: dict[str, list[torch.Tensor]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in trainable:
        if _held_by_embedding_layer(model, name):
            groups["embedding"].append(param)
        elif id(param) in b_ids or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    fast = lr * loraplus_lr_ratio
    return [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": fast},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": fast},
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A LoRA+ optimizer (arXiv:2402.12354): ``optimizer_cls`` over ``loraplus_param_groups``.

    Args:
        model: a lorakit model (PeftModel or a model with LoRA layers injected)
        optimizer_cls: e.g. ``torch.optim.AdamW``; bitsandbytes 8-bit Adam keeps embeddings in 32 bits
        lr: A's learning rate (also the optimizer's default lr)
        loraplus_lr_ratio: eta_B / eta_A; the paper recommends >= 1 (e.g. 16), with a somewhat smaller lr
        loraplus_weight_decay: weight decay of every group except non-decaying B / 1-D parameters
        loraplus_lr_embedding: learning rate of embedding LoRA factors
        kwargs: further optimizer arguments (betas, eps, ...)
    """
    groups = loraplus_param_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=loraplus_weight_decay,
        loraplus_lr_embedding=loraplus_lr_embedding,
    )
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes  # optional dependency, only for its own optimizers

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
