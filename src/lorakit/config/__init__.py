"""Adapter configuration: LoraConfig and its sub-configs."""

from .lora_config import CONFIG_NAME, LoraConfig
from .peft_config import PEFT_TYPE_TO_CONFIG, PeftConfig, PeftConfigMixin, get_peft_config
from .sub_configs import ArrowConfig, CordaConfig, EvaConfig, LoftQConfig, LoraRuntimeConfig
from .task_type import PeftType, TaskType

PEFT_TYPE_TO_CONFIG[PeftType.LORA.value] = LoraConfig
PeftConfig.register(LoraConfig)

__all__ = [
    "CONFIG_NAME",
    "PEFT_TYPE_TO_CONFIG",
    "ArrowConfig",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "PeftConfig",
    "PeftConfigMixin",
    "PeftType",
    "TaskType",
    "get_peft_config",
]
