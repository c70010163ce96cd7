"""The class a patched peft LoRA Linear takes: peft's ``lora.Linear`` with lorakit's forward.

Patching swaps the instance's ``__class__`` to a subclass made once per peft class (unpatching swaps it back), so
nothing else about the layer changes: its ``__dict__``, children, parameters, hooks, ``isinstance`` checks and
``repr`` stay peft's, and peft's class is left untouched for every other model. The subclass keeps the peft forward it
falls back to, and drops the view (``view.VIEW_KEY``) from pickles and deep copies. Its name in this module is
``PatchedLinear``, created on first lookup (a pickle of a patched model finds it after importing peft).
"""

from __future__ import annotations

from typing import Any

from .forward import patched_forward
from .versions import peft_api
from .view import VIEW_KEY

_CLASSES: dict[type, type] = {}


def _getstate(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != VIEW_KEY}


def patched_class(base: type) -> type:
    """The patched subclass of peft's ``base`` (``lora.Linear``), made once."""
    cls = _CLASSES.get(base)
    if cls is None:
        namespace = {
            "forward": patched_forward,
            "__getstate__": _getstate,
            "__module__": __name__,
            "__qualname__": "PatchedLinear",
            "_lorakit_peft_forward": base.forward,
            "_lorakit_peft_api": peft_api(),
            "_lorakit_peft_base": base,
        }
        cls = _CLASSES[base] = type(base.__name__, (base,), namespace)
    return cls


def is_patched(module: Any) -> bool:
    return type(module) in _CLASSES.values()


def __getattr__(name: str) -> Any:  # PEP 562: unpickling a patched layer looks the class up by name
    if name == "PatchedLinear":
        return patched_class(peft_api().linear)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
