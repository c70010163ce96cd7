"""lorakit: LoRA fine-tuning for PyTorch, drop-in compatible with Hugging Face PEFT's LoRA.

``from lorakit import LoraConfig, get_peft_model, PeftModel, TaskType`` replaces the same names from ``peft``.
"""

from .arrow import create_arrow_model
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import (
    PEFT_TYPE_TO_CONFIG,
    ArrowConfig,
    CordaConfig,
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraRuntimeConfig,
    PeftConfig,
    PeftType,
    TaskType,
    get_peft_config,
)
from .errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .init.corda import preprocess_corda
from .init.eva import get_eva_state_dict, initialize_lora_eva_weights
from .init.loftq_replace import replace_lora_weights_loftq
from .io.base_state_dict import get_base_model_state_dict, set_base_model_state_dict
from .io.functional import get_peft_model_state_dict, set_peft_model_state_dict
from .io.peft_weights import load_peft_weights
from .kbit import prepare_model_for_kbit_training
from .layers import LoraLayer, register_layer_type
from .mapping import get_peft_model, inject_adapter_in_model
from .model.lora_model import LoraModel
from .model.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from .patch_peft import patch_peft, unpatch_peft  # the functions (peft imported on call); shadows the subpackage name
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .utils.tensors import cast_mixed_precision_params, shift_tokens_right

__version__ = "0.1.0"

PEFT_TYPE_TO_CONFIG_MAPPING = PEFT_TYPE_TO_CONFIG  # PEFT's name: "LORA" -> LoraConfig

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "ArrowConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "cast_mixed_precision_params",
    "create_arrow_model",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "patch_peft",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "register_layer_type",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    "unpatch_peft",
]
