"""Initialisation methods, one function each, registered by ``init_lora_weights`` value."""

from . import default  # noqa: F401  (registers True, False, "gaussian")
from .registry import InitRequest, InitResult, get_init, register_init, run_init

__all__ = ["InitRequest", "InitResult", "get_init", "register_init", "run_init"]
