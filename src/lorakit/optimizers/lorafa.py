"""LoRA-FA (arXiv:2308.03303): freeze A, train only B, with B's gradient projected so the low-rank update
approximates the full fine-tuning gradient.

With A frozen, the update of the adapted weight is s * dB A. The full-weight gradient g has LoRA's B gradient
g_B = s * g A^T; the dB minimising || s * dB A - g ||_F for the step direction is

    g_B' = (1 / s^2) g_B (A A^T + 1e-8 I)^-1              g_B, g_B': (out, r), A A^T: (r, r)

(the paper's Theorem; 1e-8 I keeps the inverse finite, a pseudo-inverse drops null directions of a rank-deficient A).
g_B' then drives AdamW in transformers' "adamw_hf" form: eps 1e-6, bias correction, decoupled weight decay applied
after the Adam step (p <- p - lr * wd * p). Parameters that are not B factors (modules_to_save copies, biases, DoRA
magnitudes, lora_B biases) get that AdamW with their own gradient.

Each B uses its own layer's scaling s (rank and alpha patterns, rsLoRA, ``set_scale``), read at every step. Every
layer kind whose delta is B_2d A_2d qualifies: Linear/Conv1D, Embedding (A: (r, num_embeddings)), ungrouped ConvNd.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..layers.base import LoraLayer

PROJECTION_DAMPING = 1e-8
"""The identity multiple added to A A^T before inverting (the paper's and PEFT's value)."""


@dataclass(frozen=True)
class FrozenAFactor:
    """Where a B factor's frozen A and scaling live: adapter ``adapter`` of ``layer``."""

    layer: LoraLayer
    adapter: str

    def project(self, grad_b: torch.Tensor) -> torch.Tensor:
        """(1 / s^2) g_B (A A^T + 1e-8 I)^+ in g_B's shape and dtype (computed in float32).

        Args:
            grad_b: gradient of the stored B factor, e.g. (out, r) or (out, r, 1, 1) for ConvNd
        """
        a2d, _ = self.layer._factors_2d(self.adapter)  # (r, in)
        a32 = a2d.detach().float()
        gram = a32 @ a32.T  # (r, in) @ (in, r) -> (r, r)
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        inverse = torch.linalg.pinv(gram + PROJECTION_DAMPING * eye)
        scaling = self.layer.adapters[self.adapter].scaling
        g2d = grad_b.reshape(grad_b.shape[0], -1).float()  # (out, r)
        return ((g2d @ inverse) / scaling**2).reshape(grad_b.shape).to(grad_b.dtype)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (adamw_hf form) where each registered B factor's gradient is first projected (see the module docstring).

    Args:
        params: parameters or param groups, as for any torch optimizer
        lr, betas, eps, weight_decay, correct_bias: AdamW's hyper-parameters (adamw_hf defaults)
        frozen_a: B factor -> its frozen A (``FrozenAFactor``); B factors not listed are plain AdamW parameters
        state_keys: parameter -> the key of its entry in ``state`` (PEFT's: ``<module>.lora`` for a B factor, the
            parameter's name otherwise), so optimizer checkpoints interchange with PEFT's; missing: the parameter

    State per entry: ``step``, ``exp_avg``, ``exp_avg_sq``; ``exp_avg_B``, ``exp_avg_sq_B`` for a B factor (PEFT's
    names).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        frozen_a: dict[torch.Tensor, FrozenAFactor] | None = None,
        state_keys: dict[torch.Tensor, str] | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: each must be in [0, 1).")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0).")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0).")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.frozen_a: dict[torch.Tensor, FrozenAFactor] = dict(frozen_a or {})
        self.state_keys: dict[torch.Tensor, str] = dict(state_keys or {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                factor = self.frozen_a.get(param)
                if factor is not None:
                    grad = factor.project(grad)
                self._adamw_update(param, grad, group, "_B" if factor is not None else "")
        return loss

    def _adamw_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], suffix: str) -> None:
        """One adamw_hf step of ``param`` with gradient ``grad`` (same shape); ``suffix`` "_B" for a B factor."""
        state = self.state[self.state_keys.get(param, param)]
        avg, avg_sq = f"exp_avg{suffix}", f"exp_avg_sq{suffix}"
        if not state:
            state["step"] = 0
            state[avg] = torch.zeros_like(param)
            state[avg_sq] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state[avg], state[avg_sq]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the step (adamw_hf)
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def _lora_pairs(model: nn.Module) -> dict[torch.Tensor, FrozenAFactor]:
    """Every (B factor -> FrozenAFactor) of the model's LoRA layers, for every adapter."""
    pairs: dict[torch.Tensor, FrozenAFactor] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.adapters:
            _, lora_b = module._factors(adapter)
            pairs[lora_b] = FrozenAFactor(module, adapter)
    return pairs


def _check_projectable(factor: FrozenAFactor) -> None:
    groups = getattr(factor.layer.get_base_layer(), "groups", 1)
    if factor.layer.layer_kind == "conv" and groups > 1:
        raise ValueError(
            f"LoRA-FA needs the delta weight as B @ A, which a grouped conv (groups={groups}) does not have; adapter "
            f"{factor.adapter!r} targets one. Exclude grouped convs from the adapter or use another optimizer."
        )


def _resolve_rslora(model: nn.Module, use_rslora: bool | None) -> None:
    """PEFT's deprecated ``use_rslora`` argument: it must agree with the active adapters' configs."""
    if use_rslora is None:
        return
    configs = getattr(model, "peft_config", {})
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    mismatched = [a for a in active if bool(configs[a].use_rslora) != use_rslora]
    if mismatched:
        raise ValueError(
            f"use_rslora={use_rslora} was passed to create_lorafa_optimizer, but active adapters {mismatched} have "
            "use_rslora set differently in their LoraConfig. Configure rsLoRA in LoraConfig and drop the argument."
        )
    warnings.warn(
        "use_rslora in create_lorafa_optimizer is deprecated (as in PEFT); each layer's own scaling is used. "
        "Configure rsLoRA in LoraConfig instead.",
        FutureWarning,
        stacklevel=3,
    )


def _warn_if_rank_alpha_differ(model: nn.Module, r: int, lora_alpha: float) -> None:
    """``r`` and ``lora_alpha`` are PEFT's signature; the projection uses each layer's own scaling instead. Say so
    when they disagree with an active adapter's config rather than ignore them silently."""
    configs = getattr(model, "peft_config", {})
    for name in getattr(model, "active_adapters", []):
        config = configs.get(name)
        if config is not None and (config.r != r or config.lora_alpha != lora_alpha):
            warnings.warn(
                f"create_lorafa_optimizer got r={r}, lora_alpha={lora_alpha}, but adapter {name!r} has r={config.r}, "
                f"lora_alpha={config.lora_alpha}; the projection uses each layer's own scaling (its rank and alpha).",
                stacklevel=3,
            )


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> LoraFAOptimizer:
    """A LoRA-FA optimizer (arXiv:2308.03303) for ``model``: freezes every LoRA A factor (lora_A and
    lora_embedding_A) and returns a ``LoraFAOptimizer`` over the parameters that still require grad.

    Args:
        model: a lorakit model with at least one trainable adapter
        r, lora_alpha: the adapter's rank and alpha (PEFT's signature; each layer's own scaling is used, and a
            warning names an active adapter whose config disagrees)
        lr, weight_decay: AdamW's (betas (0.9, 0.999), eps 1e-6)
        use_rslora: deprecated, as in PEFT: must match the active adapters' configs when given
    Raises:
        ValueError: r <= 0, a negative lr or weight_decay, no trainable LoRA B factor, a grouped conv adapter,
            or a use_rslora that disagrees with the configs
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}.")
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}.")
    _resolve_rslora(model, use_rslora)
    pairs = {b: f for b, f in _lora_pairs(model).items() if b.requires_grad}
    if not pairs:
        trainable = sum(1 for p in model.parameters() if p.requires_grad)
        raise ValueError(
            f"create_lorafa_optimizer found no trainable LoRA B factor in {type(model).__name__} ({trainable} "
            "trainable parameters in all). Wrap the model with get_peft_model first and make sure an adapter is "
            "active and not in inference mode."
        )
    for factor in pairs.values():
        _check_projectable(factor)
    _warn_if_rank_alpha_differ(model, r, lora_alpha)
    for factor in _lora_pairs(model).values():
        factor.layer._factors(factor.adapter)[0].requires_grad_(False)  # A is frozen: LoRA-FA trains B only
    named = list(model.named_parameters())  # all of them, frozen ones too, as PEFT: checkpoints line up by index
    group = {
        "params": [p for _, p in named],
        "names": [n for n, _ in named],
        "scaling_factors": _scaling_factors(model, named),
        "lr": lr,
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group], frozen_a=pairs, state_keys=_state_keys(named, pairs))


def _scaling_factors(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> list[float | None]:
    """Per parameter, the scaling of the LoRA adapter it belongs to (None otherwise): PEFT's ``scaling_factors``
    group entry. Recorded for PEFT's optimizer; this one reads each layer's scaling live at every step."""
    owners = {
        id(p): layer.adapters[name].scaling
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
        for name in layer.adapters
        for p in layer.adapter_parameters(name)
    }
    return [float(owners[id(p)]) if id(p) in owners else None for _, p in named]


def _state_keys(named: list[tuple[str, torch.Tensor]], pairs: dict[torch.Tensor, FrozenAFactor]) -> dict:
    """PEFT's state keys: ``<module path>.lora`` for a B factor (``.<adapter>`` appended when several adapters of
    one layer train together, where PEFT's keys collide), the parameter's name for anything else."""
    keys: dict[torch.Tensor, str] = {}
    used: set[str] = set()
    for name, param in named:
        key = name
        if param in pairs:
            key = name[: name.find(".lora_") + 1] + "lora"
            if key in used:
                key = f"{key}.{pairs[param].adapter}"
        used.add(key)
        keys[param] = key
    return keys
