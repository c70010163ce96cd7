"""TRL's trainers for lorakit models (``pip install lorakit[trl]``): import them from here instead of from ``trl``.

    from lorakit.integrations.trl import SFTTrainer, DPOTrainer, GRPOTrainer

Same arguments as TRL's classes; ``peft_config`` takes a ``lorakit.LoraConfig``. Other TRL trainers:
``lorakit_trainer(trl.KTOTrainer)``, or mix ``LorakitTRLMixin`` in front of one.
"""

from .mixin import LorakitTRLMixin
from .reference import AdapterReference
from .trainers import DPOTrainer, GRPOTrainer, SFTTrainer, lorakit_trainer

__all__ = ["AdapterReference", "DPOTrainer", "GRPOTrainer", "LorakitTRLMixin", "SFTTrainer", "lorakit_trainer"]
