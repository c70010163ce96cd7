"""transformers' ``Trainer`` for lorakit models: checkpoints hold only the adapter, and resuming restores it.

transformers' Trainer recognises PEFT models by ``isinstance(model, peft.PeftModel)`` (``trainer_utils._is_peft_model``,
``Trainer._save``, ``_load_from_checkpoint``, ``_load_best_model``). A lorakit model is not a peft class (lorakit never
imports peft), so a plain Trainer would save a full ``model.safetensors`` of the whole model and could not resume
from an adapter-only checkpoint. ``LorakitTrainerMixin`` overrides exactly those places:

- ``_save``: ``model.save_pretrained(dir)``, i.e. ``adapter_config.json`` + ``adapter_model.safetensors`` (other
  adapters in sub-folders), the same files PEFT writes; no full model weights.
- ``_load_from_checkpoint`` / ``_load_best_model``: copy the saved adapter tensors into the existing adapter
  parameters in place (the optimizer state, loaded afterwards, refers to these very parameters).
- model introspection (accepted columns, label names, loss kwargs, label-smoothing shift) uses the base model, as
  the Trainer does for PEFT models.

Usage::

    from lorakit.integrations.transformers import LorakitTrainer
    trainer = LorakitTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                  # checkpoints: adapter files + optimizer/scheduler/state
    trainer.train(resume_from_checkpoint=True)       # continues from the last checkpoint

For another Trainer subclass: ``class MyTrainer(LorakitTrainerMixin, MyBaseTrainer): pass``; TRL's trainers come from
``lorakit.integrations.trl``.
Under FSDP and DeepSpeed ``save_model`` gathers only the adapter's tensors (``trainer_save``).
Models that are not lorakit models are passed to the Trainer's own code unchanged.

This module imports transformers at import time; ``import lorakit`` does not import it.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from ..peft_model import PeftModel

if TYPE_CHECKING:
    import torch.nn as nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_ARGS_NAME = "training_args.bin"


def lorakit_model(model: nn.Module | None) -> PeftModel | None:
    """``model`` itself, or the lorakit PeftModel inside a torch.compile / DDP wrapper; None if there is none."""
    for _ in range(4):
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    return None


def adapter_folder(checkpoint: str | os.PathLike, adapter_name: str) -> str:
    """Where ``save_pretrained`` puts an adapter: ``default`` at the root, others in a sub-folder of their name."""
    return str(checkpoint) if adapter_name == "default" else os.path.join(checkpoint, adapter_name)


def has_adapter_files(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(folder, f)) for f in ADAPTER_FILES
    )


def restore_adapters(model: PeftModel, checkpoint: str | os.PathLike) -> list[str]:
    """Copy every adapter of ``model`` saved under ``checkpoint`` into its parameters, in place.

    Returns the restored adapter names. Raises ValueError if the checkpoint holds none of the model's adapters, or
    (from the loader) if a tensor does not fit the model.
    """
    from ..io.checkpoint import read_adapter_weights
    from ..io.functional import set_peft_model_state_dict

    found = {name: adapter_folder(checkpoint, name) for name in model.peft_config}
    found = {name: folder for name, folder in found.items() if has_adapter_files(folder)}
    if not found:
        raise ValueError(
            f"No adapter files ({ADAPTER_CONFIG_NAME} + {ADAPTER_FILES[0]}) for the model's adapters "
            f"{sorted(model.peft_config)} in checkpoint {str(checkpoint)!r}."
        )
    for name, folder in found.items():
        try:
            set_peft_model_state_dict(model, read_adapter_weights(folder), name)
        except ValueError as err:
            raise ValueError(f"Cannot resume adapter {name!r} from {folder}: {err}") from err
    return sorted(found)


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


class LorakitTrainerMixin:
    """Makes a ``transformers.Trainer`` (sub)class treat lorakit models as it treats PEFT models. See the module doc."""

    lorakit_aware = True  # a plain Trainer given a lorakit model is refused (``lorakit.trainer_seam``); this one is not
    _lorakit_introspect = True  # redo the Trainer's model introspection on the base model (TRL classes do their own)

    _lorakit_trl_aware = False  # set by LorakitTRLMixin, which handles what TRL's constructors do with the model

    def __init__(self, *args: Any, fused_loss: bool = True, **kwargs: Any) -> None:
        """``fused_loss`` (default True): causal LMs compute their training loss in chunks without the full logits
        (``PeftModel.enable_fused_loss``; the same loss and gradients, far less memory for large vocabularies).
        Training forwards with labels then return ``logits=None``; evaluation gets logits. False leaves the model's
        setting as it is."""
        trl_bases = [c.__qualname__ for c in type(self).__mro__ if c.__module__.split(".")[0] == "trl"]
        if trl_bases and not self._lorakit_trl_aware:
            raise TypeError(
                f"LorakitTrainerMixin cannot adapt TRL's {trl_bases[0]}: use lorakit.integrations.trl "
                f"(`from lorakit.integrations.trl import {trl_bases[0]}`, or `LorakitTRLMixin` in front of it)."
            )
        super().__init__(*args, **kwargs)
        model = lorakit_model(self.model)
        if model is None:
            return
        if self.args.fsdp and not getattr(self, "is_fsdp_enabled", False) and self.args.world_size > 1:
            warnings.warn(
                "fsdp was requested, but accelerate shards with FSDP only on accelerator devices: this CPU run trains "
                "with DDP (every rank holds the whole model).",
                stacklevel=2,
            )
        if self._lorakit_introspect:
            self._inspect_base_model(model.get_base_model())
        if fused_loss and _is_causal_lm(model.get_base_model()) and model.__dict__.get("_fused_loss") is None:
            model.enable_fused_loss()

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        """DDP without ``find_unused_parameters``: only the active adapters train, and every one of them is used."""
        built = super()._build_accelerator_args(**kwargs)
        if lorakit_model(self.model) is not None and self.args.ddp_find_unused_parameters is None:
            for handler in built.get("kwargs_handlers", ()):
                if hasattr(handler, "find_unused_parameters"):
                    handler.find_unused_parameters = False
        return built

    def _inspect_base_model(self, base: nn.Module) -> None:
        """Redo the Trainer's model introspection on the base model instead of the wrapper's ``forward(*args)``."""
        from transformers.utils import can_return_loss, find_labels

        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))
        if not hasattr(base, "accepts_loss_kwargs"):
            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if getattr(self, "label_smoother", None) is not None and getattr(self, "compute_loss_func", 0) is None:
            # the Trainer picks the label shift from the model's class name, which for a wrapper is ours
            self.compute_loss_func = functools.partial(self.label_smoother, shift_labels=_is_causal_lm(base))

    def _set_signature_columns_if_needed(self) -> None:
        model = lorakit_model(self.model)
        if self._signature_columns is None and model is not None and self._lorakit_introspect:
            columns = list(inspect.signature(model.get_base_model().forward).parameters)
            self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names} - set(columns))
        super()._set_signature_columns_if_needed()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP / DeepSpeed: gather the adapter tensors on every rank (``trainer_save``), save on rank 0."""
        model = lorakit_model(self.model)
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if model is None or not sharded:
            return super().save_model(output_dir, _internal_call)
        from .trainer_save import gather_for_save

        self._save(output_dir, state_dict=gather_for_save(self, model))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model = lorakit_model(self.model)
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        extra = {} if state_dict is None else {"state_dict": state_dict}  # a gathered state dict (SageMaker MP)
        model.save_pretrained(output_dir, safe_serialization=getattr(self.args, "save_safetensors", True), **extra)
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = lorakit_model(model if model is not None else self.model)
        if target is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = lorakit_model(self.model)
        if model is None:
            return super()._load_best_model()
        restore_adapters(model, self.state.best_model_checkpoint)
        return None


class LorakitTrainer(LorakitTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves and resumes lorakit models as adapters only (see the module doc)."""
