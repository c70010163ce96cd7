"""Type and range checks of LoraConfig fields: one clear ValueError naming the field, what was given and what is
accepted, before anything is built. PEFT takes these values unchecked (a string as a flag is truthy, a NaN alpha
multiplies every output); docs/features.md lists where lorakit is stricter.

Each check receives a label for the message (the field name in backticks, or ``rank_pattern['q']`` for an entry) and
the value, and returns the normalised value (or raises): numpy scalars become Python numbers (JSON-ready).
``FIELD_CHECKS`` maps a field to its check; LoraConfig runs them all first in ``__post_init__``.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable
from typing import Any

BOOL_FIELDS = (
    "inference_mode",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "ensure_weight_tying",
    "use_qalora",
)


def _kind(value: Any) -> str:
    return type(value).__name__


def _is_int(value: Any) -> bool:
    """Integers, numpy's included; never bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> int | float:
    """A Python int or float for an integral / real number of any type (numpy scalars)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_bool(name: str, value: Any) -> bool:
    """Flags take True or False only: ``use_rslora="no"`` is truthy and would switch rsLoRA on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({_kind(value)}).")
    return value


def check_alpha(name: str, value: Any) -> int | float:
    """A finite real number (int or float); 0 warns (the adapter then does nothing). NaN / inf poison every output
    (and ``addmm(alpha=nan)`` on CPU even depends on the input's rank)."""
    if not _is_real(value):
        hint = " (a number, not a string)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a finite number{hint}, got {value!r} ({_kind(value)}).")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if value == 0:
        warnings.warn(f"{name} is 0: scaling is 0, so this adapter changes nothing and gets no gradient.", stacklevel=5)
    return _plain(value)


def check_dropout(name: str, value: Any) -> float:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r} ({_kind(value)}); give a number, 0 for no dropout.")
    return _plain(value)


def check_module_names(name: str, value: Any) -> list[str] | str | None:
    """None, a regex string (full match), or a list / tuple / set of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} {value!r} is not a valid regular expression: {err}.") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(
        f"{name} must be a list of strings or a regex string, got {value!r} ({_kind(value)}); None picks the defaults."
        + (" Give the names as a list, e.g. list(your_dict)." if isinstance(value, dict) else "")
    )


def check_modules_to_save(name: str, value: Any) -> list[str] | None:
    """None or a list of names; a bare string is one name (PEFT would iterate its letters)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(f"{name} must be a list of module names or None; got {value!r} ({_kind(value)}).")


def check_layer_indices(name: str, value: Any) -> list[int] | int | None:
    """None, a non-negative int, or a list of them (the range of the model is checked at injection)."""
    if value is None:
        return None
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 0 for v in value):
        return [int(v) for v in value]
    raise ValueError(
        f"{name} must be a non-negative layer index or a list of them (e.g. [0, 1]); got {value!r} ({_kind(value)})."
    )


def check_pattern_keys(name: str, value: Any, check_value: Callable[[str, Any], Any]) -> dict:
    """A dict of regex key -> value; every key must compile and every value pass ``check_value``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of regex -> value, got {value!r} ({_kind(value)}).")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings (regular expressions), got {key!r} ({_kind(key)}).")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression: {err}.") from None
    return {key: check_value(f"{name.strip('`')}[{key!r}]", item) for key, item in value.items()}


def check_rank(name: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({_kind(value)}).")
    return int(value)


FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(BOOL_FIELDS, check_bool),
    "r": check_rank,
    "lora_alpha": check_alpha,
    "lora_dropout": check_dropout,
    "target_modules": check_module_names,
    "exclude_modules": check_module_names,
    "modules_to_save": check_modules_to_save,
    "layers_to_transform": check_layer_indices,
    "rank_pattern": lambda name, value: check_pattern_keys(name, value, check_rank),
    "alpha_pattern": lambda name, value: check_pattern_keys(name, value, check_alpha),
}
"""LoraConfig field -> check(name, value) returning the normalised value."""


def check_fields(config: Any) -> None:
    """Run every check of ``FIELD_CHECKS`` on ``config``, writing back the normalised values."""
    for name, check in FIELD_CHECKS.items():
        setattr(config, name, check(f"`{name}`", getattr(config, name)))
