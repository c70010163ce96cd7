"""LoRA layer types and the registry that picks one per module."""

from .base import LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear
from .mha import MultiheadAttention
from .record import AdapterRecord
from .registry import LAYER_TYPES, create_lora_layer, register_layer_type
from .variant import LoraVariant

__all__ = [
    "LAYER_TYPES",
    "AdapterRecord",
    "Conv",
    "Embedding",
    "Linear",
    "LoraLayer",
    "LoraVariant",
    "MultiheadAttention",
    "create_lora_layer",
    "register_layer_type",
]
