"""Optimizers made for LoRA: LoRA+ (separate learning rates for A and B) and LoRA-FA (frozen A, projected B)."""

from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer, loraplus_param_groups

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer", "loraplus_param_groups"]
