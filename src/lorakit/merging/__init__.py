"""Combining adapters: ``add_weighted_adapter`` and its registry of combination types (cat, linear, svd, TIES, DARE,
magnitude pruning and their SVD forms)."""

from .registry import COMBINATIONS, Combination, Options, Source, register_combination
from .weighted import add_weighted_adapter

__all__ = ["COMBINATIONS", "Combination", "Options", "Source", "add_weighted_adapter", "register_combination"]
