"""What a causal LM does between its backbone's last hidden state and the loss: a registry keyed by model class.

transformers' ``*ForCausalLM.forward`` is the same few lines in every family (backbone, ``logits_to_keep`` slice,
``lm_head``, ``loss_function``) except for what happens to the logits before the loss and for MoE's auxiliary loss.
A ``HeadRecipe`` records exactly that, per class, read from the modeling code of each family:

* plain: Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo-2, GPT-2, GPT-NeoX, Starcoder2;
* ``softcap`` (Gemma 2/3): ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping``;
* ``multiply`` (Cohere 1/2: ``model.logit_scale``), ``divide`` (Granite: ``config.logits_scaling``);
* ``moe`` (Mixtral, Qwen2-MoE, Qwen3-MoE): ``loss += router_aux_loss_coef * load_balancing_loss(router_logits)``
  when ``output_router_logits`` is on (argument, else config), with the family's own balancing function.

A class not in the table is not guessed at: the fused loss falls back to the model's own forward with a warning.
``register_head("MyForCausalLM", HeadRecipe(...))`` adds one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LogitsMap:
    """Element-wise map of the logits, applied in this order: ``* multiply``, ``/ divide``, softcap."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) -> (N, V), in the logits' dtype, as the models do before their loss upcasts to float32."""
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def identity(self) -> bool:
        return self.multiply is None and self.divide is None and self.softcap is None


def _none(model: nn.Module) -> LogitsMap:
    return LogitsMap()


def _softcap(model: nn.Module) -> LogitsMap:
    return LogitsMap(softcap=getattr(model.config, "final_logit_softcapping", None))


def _logit_scale(model: nn.Module) -> LogitsMap:
    return LogitsMap(multiply=model.logit_scale)


def _logits_scaling(model: nn.Module) -> LogitsMap:
    return LogitsMap(divide=model.config.logits_scaling)


@dataclass(frozen=True)
class HeadRecipe:
    """``logits``: the model -> its LogitsMap; ``moe``: the model adds a router load-balancing loss."""

    logits: Callable[[nn.Module], LogitsMap] = _none
    moe: bool = False


PLAIN = HeadRecipe()
SOFTCAP = HeadRecipe(logits=_softcap)
LOGIT_SCALE = HeadRecipe(logits=_logit_scale)
LOGITS_SCALING = HeadRecipe(logits=_logits_scaling)
MOE = HeadRecipe(moe=True)

HEADS: dict[str, HeadRecipe] = {
    "LlamaForCausalLM": PLAIN,
    "MistralForCausalLM": PLAIN,
    "Qwen2ForCausalLM": PLAIN,
    "Qwen3ForCausalLM": PLAIN,
    "GemmaForCausalLM": PLAIN,
    "Phi3ForCausalLM": PLAIN,
    "Olmo2ForCausalLM": PLAIN,
    "Starcoder2ForCausalLM": PLAIN,
    "GPT2LMHeadModel": PLAIN,
    "GPTNeoXForCausalLM": PLAIN,
    "Gemma2ForCausalLM": SOFTCAP,
    "Gemma3ForCausalLM": SOFTCAP,
    "CohereForCausalLM": LOGIT_SCALE,
    "Cohere2ForCausalLM": LOGIT_SCALE,
    "GraniteForCausalLM": LOGITS_SCALING,
    "MixtralForCausalLM": MOE,
    "Qwen2MoeForCausalLM": MOE,
    "Qwen3MoeForCausalLM": MOE,
}


def register_head(class_name: str, recipe: HeadRecipe) -> None:
    """Let the fused loss run on ``class_name`` models (the class's ``__name__``), with ``recipe``."""
    if not isinstance(recipe, HeadRecipe):
        raise TypeError(f"recipe must be a lorakit.loss.HeadRecipe, got {type(recipe).__name__}.")
    HEADS[class_name] = recipe


def head_recipe(model: nn.Module) -> HeadRecipe | None:
    return HEADS.get(type(model).__name__)


def moe_aux_loss(model: nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None):
    """``router_aux_loss_coef * load_balancing_loss_func(...)`` with the family's own function (its module's)."""
    balance = sys.modules[type(model).__module__].load_balancing_loss_func
    aux = balance(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
    return aux, model.router_aux_loss_coef * aux
