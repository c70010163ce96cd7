"""A plain ``transformers.Trainer`` (or a TRL trainer imported from ``trl``) given a lorakit model: refused at once.

Such a trainer recognises adapter models only as ``peft.PeftModel`` instances. With a lorakit model it would save the
whole model into every checkpoint (and die on tied embeddings with a raw safetensors error), write no
``adapter_config.json``, and TRL's trainers would crash on their first step. ``refuse_unaware_trainer`` is called
when the Trainer's constructor first inspects the model: if the object constructing it is a transformers Trainer
without ``lorakit_aware = True`` (the mark of ``LorakitTrainerMixin``), it raises one error that names the classes to
use instead. The check looks a few frames up the stack for that trainer (``self`` of the calling method); transformers
is never imported here.
"""

from __future__ import annotations

import sys

_FRAMES = 4

REMEDY = (
    "Use lorakit's trainer classes, which save and resume the adapter only: "
    "`from lorakit.integrations.transformers import LorakitTrainer` (for transformers' Trainer) or "
    "`from lorakit.integrations.trl import SFTTrainer, DPOTrainer, GRPOTrainer` (for TRL's); "
    "for another Trainer subclass, mix in `LorakitTrainerMixin` (or `LorakitTRLMixin` for TRL) first."
)


def _calling_trainer() -> object | None:
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        return None
    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_cls):
            return owner
        frame = frame.f_back
    return None


def refuse_unaware_trainer() -> None:
    """Raise TypeError if a transformers Trainer that does not know lorakit models is inspecting one (see module)."""
    trainer = _calling_trainer()
    if trainer is not None and not getattr(trainer, "lorakit_aware", False):
        name = type(trainer).__qualname__
        raise TypeError(f"{name} was given a lorakit model, which it cannot save or resume. {REMEDY}")
