"""LoRA on an nn.Parameter (``target_parameters``): 2-D weights and the 3-D expert stacks of MoE layers.

A module that uses a parameter directly (e.g. ``einsum`` / ``grouped_mm`` over ``experts.gate_up_proj``) has no
Linear to wrap, so the wrapper adapts the parameter itself: while the module runs, the parameter reads as
W + s * dW (one fused ``baddbmm``, computed once per call), and the module's own code is untouched.

Layouts, as PEFT stores them (so checkpoints match):
- 2-D (out, in): like Linear, A (r, in), B (out, r).
- 3-D (E, out, in) (transformers' default expert layout, ``F.linear(x, W[e])``), or (E, in, out) when the module
  says ``is_transposed = True``: A = lora_A.weight (r*E, in), rows grouped by expert -> (E, r, in);
  B = lora_B.weight (out, r*E), column k*E + e -> (E, out, r); dW[e] = B_e A_e (transposed for (E, in, out)).

Several parameters of one module get one wrapper each, nested: the parameter registered first is wrapped innermost.
Dropout, lora_bias, fan_in_fan_out, variants (DoRA, aLoRA) and mixed-adapter batches are refused: the input of
the adapted product is not visible from outside the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..delta import add_low_rank, delta_matrix
from .base import LoraLayer
from .record import AdapterRecord

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..routing import BatchRouting


def _owner(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


@contextlib.contextmanager
def substituted_parameter(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Inside the block ``module.<name>`` reads as ``value`` (a tensor in the autograd graph); the Parameter comes
    back afterwards, even on errors. ``state_dict`` and optimisers only ever see the Parameter."""
    params = module._parameters
    original = params[name]
    params[name] = value
    try:
        yield
    finally:
        params[name] = original


class ParamWrapper(LoraLayer):
    """Adapts ``base_layer``'s parameter ``parameter_name`` (2-D (out, in), or 3-D experts) with LoRA."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        param = getattr(_owner(base_layer), parameter_name)
        transposed = False
        if param.dim() == 2:
            num_experts, (out_features, in_features) = 1, param.shape
        elif param.dim() == 3:
            transposed = bool(getattr(_owner(base_layer), "is_transposed", False))
            num_experts, d1, d2 = param.shape
            in_features, out_features = (d1, d2) if transposed else (d2, d1)
        else:
            raise ValueError(
                f"target_parameters: {type(_owner(base_layer)).__name__}.{parameter_name} has shape "
                f"{tuple(param.shape)}; only 2-D (out, in) and 3-D (experts, out, in) parameters can be adapted."
            )
        super().__init__(base_layer, in_features, out_features)
        self.parameter_name = parameter_name
        self.num_experts = num_experts
        self.param_transposed = transposed
        self.layer_kind = "linear" if param.dim() == 2 else "experts"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # ------------------------------------------------------------------ the adapted parameter
    @property
    def weight(self) -> torch.Tensor:
        """The targeted parameter without LoRA (the adapted value exists only while the module runs)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    @property
    def bias(self) -> None:
        return None

    # ------------------------------------------------------------------ LoraLayer hooks
    def _check_supported(self, adapter_name: str, record: AdapterRecord, config: LoraConfig, module_name: str) -> None:
        from ..variants import REQUESTED_BY_CONFIG, VARIANTS

        refused = {
            f"lora_dropout={record.dropout}": record.dropout > 0,
            "lora_bias=True": record.lora_bias,
            "fan_in_fan_out=True": config.fan_in_fan_out,
        }
        refused.update({f"the {n!r} variant": wants(config) for n, wants, _ in VARIANTS})
        refused.update({f"the {n!r} variant": wants(config) for n, wants in REQUESTED_BY_CONFIG.items()})
        basic_init = config.init_lora_weights in (True, False, "gaussian")
        refused[
            f"init_lora_weights={config.init_lora_weights!r} (3-D expert stacks take True, False or 'gaussian')"
        ] = self.weight.dim() == 3 and not basic_init
        asked = sorted({setting for setting, on in refused.items() if on})
        if asked:
            raise ValueError(
                f"target_parameters: parameter {module_name!r} cannot be adapted with {', '.join(asked)}; the "
                "parameter's input is not visible from outside its module, so only plain LoRA applies."
            )

    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        rank = record.r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert views (A (E, r, in), B (E, out, r)) of the stacked factors."""
        a, b = self._factors(name)
        experts = self.num_experts
        return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)

    def _weight_from_3d(self, per_expert: torch.Tensor) -> torch.Tensor:
        """(E, out, in) -> the parameter's layout."""
        if self.param_transposed:
            per_expert = per_expert.transpose(-2, -1)
        return per_expert.reshape(self.weight.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * B_e @ A_e for every expert, float32, in the parameter's layout ((out, in) for 2-D)."""
        lora_a, lora_b = self._expert_factors(adapter_name)
        return self._weight_from_3d(delta_matrix(lora_a, lora_b, self.adapters[adapter_name].scaling))

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ParamWrapper adapts its parameter during forward; there is no additive term.")

    # ------------------------------------------------------------------ forward
    def adapted_weight(self, names: list[str]) -> torch.Tensor:
        """W + sum over ``names`` of s * dW, in the parameter's dtype, differentiable in the factors."""
        weight = self.weight
        batched = weight if weight.dim() == 3 else weight.unsqueeze(0)
        for name in names:
            lora_a, lora_b = self._expert_factors(name)  # (E, r, in), (E, out, r)
            left, right = (
                (lora_a.transpose(-2, -1), lora_b.transpose(-2, -1)) if self.param_transposed else (lora_b, lora_a)
            )
            batched = add_low_rank(batched, left, right, self.adapters[name].scaling)
        return batched.reshape(weight.shape)

    def _forward_active(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module runs with W + sum of the active, unmerged adapters' deltas in place of W."""
        names = [n for n in self._active_adapters if n in self.adapters and n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        with substituted_parameter(self.get_base_layer(), self.parameter_name, self.adapted_weight(names)):
            return self.base_layer(x, *args, **kwargs)

    def _forward_mixed(self, x: Any, routing: BatchRouting, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            f"Mixed-adapter batches (adapter_names=...) do not support target_parameters adapters (parameter "
            f"{self.parameter_name!r} of {type(self.get_base_layer()).__name__}); run each adapter in its own batch "
            "with set_adapter()."
        )

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()
