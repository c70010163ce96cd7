"""Per-layer rank and alpha from ``rank_pattern`` / ``alpha_pattern`` (PEFT's semantics: first match wins)."""

from __future__ import annotations

import re
import warnings

from ..config import LoraConfig


def _first_match(pattern: dict, key: str) -> str | None:
    for pat in pattern:
        if re.match(rf"(.*\.)?({pat})$", key):
            return pat
    return None


def rank_and_alpha(config: LoraConfig, key: str) -> tuple[int, float]:
    """(r, lora_alpha) for the module at path ``key``."""
    r_key = _first_match(config.rank_pattern, key)
    a_key = _first_match(config.alpha_pattern, key)
    r = config.rank_pattern[r_key] if r_key is not None else config.r
    alpha = config.alpha_pattern[a_key] if a_key is not None else config.lora_alpha
    return r, alpha


def warn_unused_patterns(config: LoraConfig, targeted: list[str]) -> None:
    """Warn about pattern keys that match none of the targeted layers (RuntimeWarning, as PEFT)."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field_name)
        unused = [p for p in pattern if not any(re.match(rf"(.*\.)?({p})$", k) for k in targeted)]
        if unused:
            warnings.warn(
                f"{field_name} keys {unused} match none of the targeted layers; targeted layers include "
                f"{', '.join(sorted(targeted)[:8])}{' ...' if len(targeted) > 8 else ''}.",
                RuntimeWarning,
                stacklevel=4,
            )
