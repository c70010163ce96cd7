"""Initialisation methods, one function each, registered by ``init_lora_weights`` value."""

from . import corda, default, eva, loftq, olora, orthogonal, pissa  # noqa: F401  (each module registers its methods)
from .registry import InitRequest, InitResult, get_init, register_init, run_init

__all__ = ["InitRequest", "InitResult", "get_init", "register_init", "run_init"]
