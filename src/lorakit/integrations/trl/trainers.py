"""TRL's trainers for lorakit models: same names and arguments as TRL's (see ``mixin`` for what changes)."""

from __future__ import annotations

from typing import Any

import trl

from ..transformers import lorakit_model
from .mixin import LorakitTRLMixin
from .reference import reference_mode


class SFTTrainer(LorakitTRLMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` taking a lorakit model, or a base model / id with ``peft_config=lorakit.LoraConfig``."""


class DPOTrainer(LorakitTRLMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose reference, without ``ref_model``, is the policy in reference mode (no copy)."""

    def compute_ref_log_probs(self, model: Any, inputs: dict) -> Any:
        # precompute_ref_log_probs scores the policy itself (TRL keeps no reference then): in reference mode
        policy = lorakit_model(model)
        if policy is None or self.ref_model is not None:
            return super().compute_ref_log_probs(model, inputs)
        with reference_mode(policy, self.reference_adapter(policy)):
            return super().compute_ref_log_probs(model, inputs)


class GRPOTrainer(LorakitTRLMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer``; with ``beta > 0`` the reference is the policy in reference mode (no copy)."""


def lorakit_trainer(trl_trainer_cls: type) -> type:
    """A subclass of any TRL trainer class that takes lorakit models: ``KTO = lorakit_trainer(trl.KTOTrainer)``."""
    return type(trl_trainer_cls.__name__, (LorakitTRLMixin, trl_trainer_cls), {"__module__": __name__})
