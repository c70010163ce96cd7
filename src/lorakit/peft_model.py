"""PeftModel: the user-facing wrapper, with PEFT's names (base_model, peft_config, save_pretrained, ...).

Task subclasses differ only where behaviour differs: sequence classification adds its head to modules_to_save,
causal LMs route ``adapter_names`` through ``generate``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from .alora_offsets import alora_adapters, alora_scope
from .config import LoraConfig, TaskType
from .integrations.checkpointing import enable_checkpointing, is_checkpointing, require_input_grads
from .mixed import batch_size_of, check_adapter_names
from .model.lora_model import LoraModel
from .routing import route_batch
from .trainer_seam import refuse_unaware_trainer

SEQ_CLS_HEADS = ("classifier", "score")


class PeftModel(nn.Module):
    """A model with LoRA adapters. ``base_model`` is the LoraModel, ``get_base_model()`` the user's model."""

    auto_modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}.")
        self._add_auto_modules_to_save(peft_config)
        self.base_model = LoraModel(
            model,
            peft_config,
            adapter_name,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
            auto_modules_to_save=self.auto_modules_to_save,
        )
        if is_checkpointing(model):
            self._enable_input_require_grads()

    def _add_auto_modules_to_save(self, config: LoraConfig) -> None:
        extra = [m for m in self.auto_modules_to_save if m not in (config.modules_to_save or [])]
        if extra:
            config.modules_to_save = [*(config.modules_to_save or []), *extra]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name == "accepts_loss_kwargs":  # a transformers Trainer's constructor inspecting the model
                refuse_unaware_trainer()
            return getattr(self.base_model, name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        refuse_unaware_trainer()  # a Trainer that would save the whole model as its checkpoint
        return super().state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules_to_save entries of all adapters together; None when there are none (as in PEFT)."""
        modules = {m for config in self.peft_config.values() for m in (config.modules_to_save or [])}
        return modules or None

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s input embeddings' output require grad, so reentrant checkpointing keeps the frozen base's
        blocks in the graph; quantized models are left alone (``prepare_model_for_kbit_training`` does it there)."""
        if not any(getattr(model, f, False) for f in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            require_input_grads(model)
        return model

    def get_layer_status(self) -> list:
        """One TunerLayerStatus per adapter module (see ``lorakit.model.status``)."""
        from .model.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The TunerModelStatus of the whole model (see ``lorakit.model.status``)."""
        from .model.status import get_model_status

        return get_model_status(self)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a packed 4-bit parameter counts two values per storage byte, as PEFT
        does (x2 for uint8 storage, x4 for bnb_4bit_quant_storage=bfloat16)."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            if param.__class__.__name__ == "Params4bit":
                n *= 2 * param.element_size()
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ forward and mixed batches
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters in the
        batch (eval mode only; see ``lorakit.mixed``). aLoRA adapters get their offsets from ``input_ids``
        (``lorakit.alora_offsets``)."""
        if adapter_names is None and not alora_adapters(self):
            return self._call_model(args, kwargs)
        names = None if adapter_names is None else check_adapter_names(self, adapter_names, batch_size_of(args, kwargs))
        with route_batch(names), alora_scope(self, args, kwargs, names):
            return self._call_model(args, kwargs)

    def _call_model(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The LoRA model's call, or, with the fused loss on, a training forward with labels whose loss is computed
        in chunks (``lorakit.loss``; None from it: the ordinary call)."""
        settings = self.__dict__.get("_fused_loss")
        if settings is not None and self.get_base_model().training:
            from .kernels.factor_casts import model_call
            from .loss import fused_causal_lm_forward

            scope = functools.partial(model_call, self.base_model)
            out = fused_causal_lm_forward(self.get_base_model(), args, kwargs, settings, scope)
            if out is not None:
                return out
        return self.base_model(*args, **kwargs)

    def enable_fused_loss(self, chunk_size: int | None = None, use_liger: bool = True) -> None:
        """Training forwards with ``labels`` compute the causal-LM loss in chunks of ``chunk_size`` tokens (None:
        ~64 MiB of float32 logits per chunk) and return ``logits=None``; loss and gradients equal the ordinary
        path's. Eval mode or no labels: the ordinary output. ``use_liger``: Liger Kernel's fused linear
        cross-entropy on CUDA for a plain Linear head, when installed. Models the fused loss cannot match exactly
        run their own forward, with one warning naming the reason (see ``lorakit.loss``)."""
        from .loss import FusedLossSettings

        self.__dict__["_fused_loss"] = FusedLossSettings(chunk_size=chunk_size, use_liger=use_liger)

    def disable_fused_loss(self) -> None:
        """Back to the model's own forward (full logits) for every call."""
        self.__dict__.pop("_fused_loss", None)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's generate (KV cache, beams, sampling); ``adapter_names`` has one name per prompt and is
        repeated per beam / return sequence automatically. aLoRA offsets come from the prompt (no beam search)."""
        generate = self.get_base_model().generate
        if adapter_names is None and not alora_adapters(self):
            return generate(*args, **kwargs)
        names = None if adapter_names is None else check_adapter_names(self, adapter_names, batch_size_of(args, kwargs))
        with route_batch(names, expandable=True), alora_scope(self, args, kwargs, names, generation=True):
            return generate(*args, **kwargs)

    # ------------------------------------------------------------------ gradient checkpointing
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The base model's activation checkpointing, plus the input-grad hook a frozen base needs (reentrant)."""
        enable_checkpointing(self.get_base_model(), activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Alias of ``activation_checkpointing_enable`` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ adapter lifecycle
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive adapter (activate it with set_adapter); on fp16/bf16 bases its weights are float32
        unless ``autocast_adapter_dtype=False``."""
        self._add_auto_modules_to_save(peft_config)
        self.base_model.inject_adapter(
            adapter_name,
            peft_config,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
            auto_modules_to_save=self.auto_modules_to_save,
        )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (outputs add up); they train unless ``inference_mode``."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    def _enable_input_require_grads(self) -> None:
        """With a frozen base and reentrant checkpointing, the embeddings' output must require grad."""
        require_input_grads(self.get_base_model())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter (``default`` at the root)."""
        from .io.checkpoint import save_adapters

        state_dicts = overrides = None
        if path_initial_model_for_weight_conversion is not None:
            from .init.conversion import converted_state_dicts

            state_dicts, overrides = converted_state_dicts(
                self, path_initial_model_for_weight_conversion, selected_adapters, save_embedding_layers
            )
        save_adapters(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            state_dicts=state_dicts,
            config_overrides=overrides,
            **kwargs,
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter files (as ``save_pretrained`` writes them) to Hub repo ``repo_id`` in one commit;
        keywords: commit_message, commit_description, private, token, revision, create_pr, safe_serialization,
        selected_adapters, tags (see ``lorakit.io.push``). Returns huggingface_hub's CommitInfo."""
        from .io.push import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter (folder or Hub id) onto ``model``; frozen and in eval mode unless is_trainable."""
        from .io.loading import load_peft_model

        return load_peft_model(
            cls,
            model,
            model_id,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            ephemeral_gpu_offload=ephemeral_gpu_offload,
            low_cpu_mem_usage=low_cpu_mem_usage,
            **kwargs,
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> tuple[list[str], list[str]]:
        """Load another saved adapter into this model under ``adapter_name`` (inactive until set_adapter).

        Returns (missing_keys, unexpected_keys), also as attributes. On any error the model is left exactly as it
        was."""
        from .io.loading import load_adapter_into

        return load_adapter_into(
            self,
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype,
            ephemeral_gpu_offload=ephemeral_gpu_offload,
            low_cpu_mem_usage=low_cpu_mem_usage,
            **kwargs,
        )


_COMMON_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "labels",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)
_SEQ2SEQ_INPUTS = (*_COMMON_INPUTS, "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds")
_QA_INPUTS = (*_COMMON_INPUTS, "start_positions", "end_positions")


def _named_forward(input_names: tuple[str, ...]):
    """A ``forward`` whose signature lists the model inputs by name, as PEFT's task classes do.

    transformers' Trainer drops dataset columns that ``model.forward``'s signature does not name; a bare
    ``(*args, **kwargs)`` would make it drop them all. The call itself is passed through unchanged.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return PeftModel.forward(self, *args, **kwargs)

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in input_names]
    params += [inspect.Parameter("adapter_names", keyword, default=None)]
    params += [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    forward.__signature__ = inspect.Signature(params)
    forward.__doc__ = PeftModel.forward.__doc__
    return forward


class PeftModelForCausalLM(PeftModel):
    """Causal LMs: generate() with KV cache and per-row adapters."""

    forward = _named_forward(_COMMON_INPUTS)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """The classification head (``classifier`` or ``score``) is trained and saved in full."""

    auto_modules_to_save = SEQ_CLS_HEADS
    forward = _named_forward(_COMMON_INPUTS)


class PeftModelForTokenClassification(PeftModel):
    auto_modules_to_save = SEQ_CLS_HEADS
    forward = _named_forward(_COMMON_INPUTS)


class PeftModelForSeq2SeqLM(PeftModel):
    forward = _named_forward(_SEQ2SEQ_INPUTS)


class PeftModelForQuestionAnswering(PeftModel):
    auto_modules_to_save = ("qa_outputs",)
    forward = _named_forward(_QA_INPUTS)


class PeftModelForFeatureExtraction(PeftModel):
    forward = _named_forward(_COMMON_INPUTS)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def peft_model_class(config: LoraConfig) -> type[PeftModel]:
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
