"""``LorakitTRLMixin``: makes a TRL trainer class take lorakit models the way it takes peft models.

Mix it in front of any TRL trainer (``class MyKTO(LorakitTRLMixin, trl.KTOTrainer)``); ``lorakit.integrations.trl``
does so for SFT, DPO and GRPO. The trainer then accepts

- a lorakit model (``get_peft_model`` / ``PeftModel.from_pretrained(..., is_trainable=True)``), or
- a base model (or a model id / local folder) plus ``peft_config=lorakit.LoraConfig(...)``,

and trains, checkpoints and resumes the adapter only (``LorakitTrainerMixin``). Trainers that score a reference model
(DPO, GRPO with ``beta > 0``, ...) get the policy itself in reference mode when no ``ref_model`` is given: adapters
disabled for an adapter created by the trainer, a frozen ``ref`` copy for an adapter trained before, as TRL does for
peft models (no second copy of the base). See ``seam`` for the three TRL helpers that are redirected while the
constructor runs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from ...config import LoraConfig
from ...layers import LoraLayer
from ...mapping import get_peft_model
from ...peft_model import PeftModel
from ..transformers import LorakitTrainerMixin, lorakit_model
from .reference import AdapterReference, add_reference_adapter, shares_storage
from .seam import SeamState, constructor_seam


def check_peft_config(peft_config: Any, model: Any) -> LoraConfig | None:
    """``peft_config`` must be a lorakit LoraConfig, and only for a model that has no adapter yet."""
    if peft_config is None:
        return None
    if not isinstance(peft_config, LoraConfig):
        origin = type(peft_config).__module__.split(".")[0]
        hint = " (a peft config: use `from lorakit import LoraConfig` with the same arguments)"
        hint = hint if origin == "peft" else ""
        raise TypeError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__qualname__}{hint}.")
    existing = lorakit_model(model)
    if existing is not None:
        raise ValueError(
            f"The model already has lorakit adapters ({sorted(existing.peft_config)}) and a peft_config was passed "
            "too: pass either the base model with peft_config, or the adapter model without it."
        )
    return peft_config


def check_output_head(policy: PeftModel) -> None:
    """TRL's fused LM head multiplies by ``lm_head.weight`` directly: a LoRA on the head would never train."""
    head = policy.get_base_model().get_output_embeddings()
    if isinstance(head, LoraLayer):
        raise ValueError(
            "LoRA on the output head (lm_head) is not supported by TRL's trainers: they compute log-probabilities from "
            "lm_head.weight directly, so the adapter would never train. Remove the head from target_modules (or add "
            "it to modules_to_save to train it in full)."
        )


def check_reference(policy: PeftModel, ref_model: nn.Module | None, args: Any) -> None:
    if ref_model is not None and not isinstance(ref_model, AdapterReference) and shares_storage(policy, ref_model):
        raise ValueError(
            "ref_model shares weights with the policy (for example it is the base model the adapter was injected "
            "into), so it would move with training. Omit ref_model: the policy with its adapters disabled is the "
            "reference, without a copy."
        )
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True needs a separate reference model to update, but with a lorakit adapter the reference "
            "is the policy with its adapter disabled. Use sync_ref_model=False."
        )


def _zero3(args: Any) -> bool:
    plugin = getattr(args, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", None) == 3


class LorakitTRLMixin(LorakitTrainerMixin):
    """See the module doc. Goes before the TRL class in the bases."""

    _lorakit_introspect = False  # TRL computes its own losses and chooses its own dataset columns
    _lorakit_trl_aware = True

    def __init__(self, *args: Any, fused_loss: bool = False, **kwargs: Any) -> None:
        """``fused_loss``: off by default here, because TRL's trainers score log-probabilities with TRL's own fused
        LM head (already chunked); True also chunks any other training forward with labels (``lorakit.loss``)."""
        trl_base = next(c for c in type(self).__mro__ if c.__module__.split(".")[0] == "trl")
        bound = inspect.signature(trl_base.__init__).bind(self, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop("self")
        call.update(call.pop("kwargs", {}))
        model, trl_args = call.get("model"), call.get("args")
        config = check_peft_config(call.pop("peft_config", None), model)
        self._lorakit_fresh_adapter = config is not None
        state = SeamState(wrap_policy=None, make_reference=self._lorakit_reference)
        if config is not None:
            self._refuse_added_tokens(trl_args)
            wrap = self._lorakit_wrapper(config, trl_args, call.get("ref_model"))
            if isinstance(model, str):
                state.wrap_policy = wrap  # TRL loads the model from the id, the seam wraps it at once
            else:
                call["model"] = model = wrap(model)
        elif lorakit_model(model) is not None:
            self._prepare_policy(lorakit_model(model), call.get("ref_model"), trl_args)
        state.policy = lorakit_model(model)
        with constructor_seam(type(self), state):
            super().__init__(**call, fused_loss=fused_loss)

    # ------------------------------------------------------------------ before TRL's constructor
    def _lorakit_wrapper(self, config: LoraConfig, trl_args: Any, ref_model: nn.Module | None):
        """The base -> policy step: ``get_peft_model`` and the policy's checks (also for a model TRL loads by id)."""

        def wrap(model: nn.Module) -> PeftModel:
            quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
            # ZeRO-3 gathers parameters in the dtype of the first one: adapters in the base dtype, as TRL does for peft
            autocast = not (_zero3(trl_args) and not quantized)
            policy = get_peft_model(model, config, autocast_adapter_dtype=autocast)
            self._prepare_policy(policy, ref_model, trl_args)
            return policy

        return wrap

    @staticmethod
    def _refuse_added_tokens(trl_args: Any) -> None:
        path = getattr(trl_args, "chat_template_path", None)
        if path is not None and not str(path).endswith((".jinja", ".j2")):
            raise NotImplementedError(
                f"chat_template_path={path!r} clones a tokenizer's template and adds tokens, which needs trainable "
                "token embeddings set up before the adapter: add the tokens and wrap the model yourself "
                "(trainable_token_indices in LoraConfig), then pass the lorakit model."
            )

    def _prepare_policy(self, policy: PeftModel, ref_model: nn.Module | None, trl_args: Any) -> None:
        check_output_head(policy)
        check_reference(policy, ref_model, trl_args)
        if _zero3(trl_args) and getattr(trl_args, "gradient_checkpointing", False):
            # ZeRO-3 with a frozen base and non-reentrant checkpointing gives wrong gradients (TRL forces the same)
            trl_args.gradient_checkpointing_kwargs = {**(trl_args.gradient_checkpointing_kwargs or {})}
            trl_args.gradient_checkpointing_kwargs["use_reentrant"] = True

    # ------------------------------------------------------------------ the reference model
    def reference_adapter(self, policy: PeftModel) -> str | None:
        """The adapter the reference runs with: None (adapters disabled) for an adapter this trainer created, else a
        frozen ``ref`` copy of the adapter the model came with (made once)."""
        if self._lorakit_fresh_adapter:
            return None
        source = "default" if "default" in policy.peft_config else policy.active_adapters[0]
        return add_reference_adapter(policy, source)

    def _lorakit_reference(self, policy: PeftModel) -> AdapterReference:
        return AdapterReference(policy, self.reference_adapter(policy))
