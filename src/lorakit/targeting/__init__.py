"""Target selection: which modules get LoRA, and with which rank and alpha."""

from .defaults import DEFAULT_TARGET_MODULES, default_target_modules
from .match import (
    ALL_LINEAR,
    expand_all_linear,
    explain_no_match,
    is_target,
    resolve_target_names,
    unmatched_entries,
    unused_exclusions,
)
from .patterns import rank_and_alpha, warn_unused_patterns

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "default_target_modules",
    "expand_all_linear",
    "explain_no_match",
    "is_target",
    "rank_and_alpha",
    "resolve_target_names",
    "unmatched_entries",
    "unused_exclusions",
    "warn_unused_patterns",
]
