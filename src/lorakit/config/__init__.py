"""Adapter configuration: LoraConfig and its sub-configs."""

from .lora_config import CONFIG_NAME, LoraConfig
from .sub_configs import ArrowConfig, CordaConfig, EvaConfig, LoftQConfig, LoraRuntimeConfig
from .task_type import PeftType, TaskType

__all__ = [
    "CONFIG_NAME",
    "ArrowConfig",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "PeftType",
    "TaskType",
]
