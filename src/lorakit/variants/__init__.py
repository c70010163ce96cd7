"""LoRA variants (DoRA, aLoRA, Arrow, ...) as strategy objects, chosen per adapter from its config.

Registry entries are ``(name, wants(config) -> bool, factory(layer, config) -> LoraVariant)``; first match wins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layers.base import LoraLayer
    from ..layers.variant import LoraVariant

VariantFactory = Callable[["LoraLayer", "LoraConfig"], "LoraVariant"]
VARIANTS: list[tuple[str, Callable[[LoraConfig], bool], VariantFactory]] = []

# Config settings that need a variant: name -> predicate. A setting with no registered variant is an error.
REQUESTED_BY_CONFIG: dict[str, Callable[[LoraConfig], bool]] = {
    "dora": lambda c: bool(c.use_dora),
    "alora": lambda c: c.alora_invocation_tokens is not None,
    "arrow": lambda c: c.arrow_config is not None,
}


def register_variant(name: str, wants: Callable[[LoraConfig], bool], factory: VariantFactory) -> None:
    VARIANTS.insert(0, (name, wants, factory))


def resolve_variant(layer: LoraLayer, config: LoraConfig) -> LoraVariant | None:
    """The variant this adapter needs on ``layer``, or None for plain LoRA. Raises ValueError when the config asks
    for several variants (e.g. DoRA and aLoRA): none of them composes with another."""
    wanted = [(name, factory) for name, wants, factory in VARIANTS if wants(config)]
    if len(wanted) > 1:
        raise ValueError(f"The config asks for the variants {sorted(n for n, _ in wanted)}, which cannot be combined.")
    if wanted:
        return wanted[0][1](layer, config)
    for name, wants in REQUESTED_BY_CONFIG.items():
        if wants(config):
            raise ValueError(f"The config asks for the {name!r} variant, which this lorakit build does not provide.")
    return None


# Built-in variants register themselves on import (after the registry above exists).
from . import alora as _alora  # noqa: E402, F401
from . import arrow as _arrow  # noqa: E402, F401
from . import dora as _dora  # noqa: E402, F401
