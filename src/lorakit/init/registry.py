"""Registry of LoRA initialisation methods: ``init_lora_weights`` value -> one function shared by all layer types.

An init function receives an ``InitRequest`` (2-D views: A is (r, in), B is (out, r), the base weight (out, in))
and returns an ``InitResult``. Adding a method adds a file and one ``register_init`` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import LoraConfig


@dataclass
class InitRequest:
    """What an init method may use. ``base_weight()`` is lazy: the default init never materialises it."""

    layer_kind: str  # "linear" | "embedding" | "conv"
    module_name: str
    rank: int
    scaling: float
    a_shape: tuple[int, int]  # (r, in)
    b_shape: tuple[int, int]  # (out, r)
    config: LoraConfig
    adapter_name: str
    base_weight: Callable[[], torch.Tensor]  # () -> (out, in) float32 copy of the base weight
    generator: torch.Generator | None = None
    layer: object | None = None  # the LoraLayer, for methods needing layer-specific data (EVA, CorDA)


@dataclass
class InitResult:
    """New values (2-D) for A and B; None keeps the current values. ``base_weight`` replaces W when set."""

    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    base_weight: torch.Tensor | None = None
    scaling: float | None = None


InitFn = Callable[[InitRequest], InitResult]

_REGISTRY: dict[str, InitFn] = {}
_PREFIX_REGISTRY: list[tuple[re.Pattern, InitFn]] = []
LAYER_KINDS: dict[str, set[str]] = {}
"""Method name -> layer kinds it supports (missing: all)."""
FROZEN_FACTORS: dict[str, frozenset[str]] = {}
"""Method name -> factors ("A", "B") that stay frozen in training (MiCA trains A only; missing: none)."""


def register_init(
    name: str | bool,
    *,
    pattern: str | None = None,
    layer_kinds: set[str] | None = None,
    frozen: frozenset[str] = frozenset(),
):
    """Decorator registering ``fn`` under ``name`` (or every value fully matching ``pattern``); ``frozen`` names the
    factors ("A", "B") the method keeps out of training."""

    def wrap(fn: InitFn) -> InitFn:
        key = str(name) if pattern is None else pattern  # the key get_init returns, so layer_kinds apply
        if pattern is not None:
            _PREFIX_REGISTRY.append((re.compile(pattern), fn))
        else:
            _REGISTRY[key] = fn
        if layer_kinds is not None:
            LAYER_KINDS[key] = set(layer_kinds)
        if frozen:
            FROZEN_FACTORS[key] = frozenset(frozen)
        return fn

    return wrap


def get_init(value: bool | str) -> tuple[str, InitFn]:
    """(registry key, function) for an ``init_lora_weights`` value; ValueError listing the known methods."""
    key = str(value)
    if key in _REGISTRY:
        return key, _REGISTRY[key]
    for pat, fn in _PREFIX_REGISTRY:
        if isinstance(value, str) and pat.fullmatch(value):
            return pat.pattern, fn
    known = sorted(_REGISTRY) + [p.pattern for p, _ in _PREFIX_REGISTRY]
    raise ValueError(f"Unknown init_lora_weights {value!r}; registered methods: {', '.join(known)}.")


def frozen_factors(value: bool | str) -> frozenset[str]:
    """The factors ("A", "B") that ``init_lora_weights=value`` keeps frozen; empty for unknown values."""
    try:
        key, _ = get_init(value)
    except ValueError:
        return frozenset()
    return FROZEN_FACTORS.get(key, frozenset())


def run_init(request: InitRequest) -> InitResult:
    """Look up and run the method named by the request's config, checking the layer kind is supported."""
    key, fn = get_init(request.config.init_lora_weights)
    kinds = LAYER_KINDS.get(key)
    if kinds is not None and request.layer_kind not in kinds:
        raise ValueError(
            f"init_lora_weights={request.config.init_lora_weights!r} cannot initialise layer "
            f"{request.module_name!r} of kind {request.layer_kind!r}; it supports: {', '.join(sorted(kinds))}."
        )
    return fn(request)
