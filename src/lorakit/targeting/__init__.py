"""Target selection: which modules get LoRA, and with which rank and alpha."""

from .defaults import DEFAULT_TARGET_MODULES, default_target_modules
from .fused_experts import EXPERT_FAMILIES, MODEL_TYPE_FAMILIES, retarget_fused_experts
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
    "EXPERT_FAMILIES",
    "MODEL_TYPE_FAMILIES",
    "default_target_modules",
    "expand_all_linear",
    "explain_no_match",
    "is_target",
    "rank_and_alpha",
    "resolve_target_names",
    "retarget_fused_experts",
    "unmatched_entries",
    "unused_exclusions",
    "warn_unused_patterns",
]
