"""The method and task enums, with PEFT's string values (they are written into adapter_config.json)."""

from __future__ import annotations

import enum


class PeftType(str, enum.Enum):
    """Adapter method. lorakit implements LORA; other values are recognised only to reject them clearly."""

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """What the wrapped model does; selects the PeftModel subclass and default modules_to_save."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
