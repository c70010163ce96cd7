"""Initialisation methods, one function each, registered by ``init_lora_weights`` value."""

from . import corda, default, eva, loftq, mica, olora, orthogonal, pissa  # noqa: F401  (each module registers its methods)
from .registry import InitRequest, InitResult, frozen_factors, get_init, register_init, run_init

__all__ = ["InitRequest", "InitResult", "frozen_factors", "get_init", "register_init", "run_init"]
