"""Trainable tokens (``LoraConfig.trainable_token_indices``): retrain a few rows of an embedding, not all of it."""

from .adapter import TokenAdapter
from .inject import wrap_trainable_tokens
from .wrapper import TrainableTokensWrapper

__all__ = ["TokenAdapter", "TrainableTokensWrapper", "wrap_trainable_tokens"]
