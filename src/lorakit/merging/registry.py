"""Combination types of ``add_weighted_adapter`` in a registry: name -> how the new rank is chosen and how one
layer's factors are combined. Adding a type is one ``register_combination`` call.

Every combiner works on 2-D views (A: (r, in), B: (out, r), any layer type) and returns the new adapter's factors
at scaling 1, so ``B_new @ A_new`` approximates (or for "cat" and full-rank SVD equals) ``sum_i w_i s_i B_i A_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..delta import delta_matrix
from . import ops


@dataclass(frozen=True)
class Source:
    """One source adapter on one layer: factors as stored (2-D views), its scaling and its combination weight."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    scaling: float
    weight: float


@dataclass(frozen=True)
class Options:
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


Combiner = Callable[[list[Source], int, Options], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Combination:
    combine: Combiner
    rank: Literal["equal", "sum", "svd"]  # new rank: the common rank, the sum of ranks, or svd_rank / max rank
    needs_density: bool = False


COMBINATIONS: dict[str, Combination] = {}


def register_combination(name: str, combination: Combination) -> None:
    """Make ``combination_type=name`` available to ``add_weighted_adapter``."""
    COMBINATIONS[name] = combination


def get_combination(name: str) -> Combination:
    if name not in COMBINATIONS:
        raise ValueError(f"Unknown combination_type {name!r}; available: {sorted(COMBINATIONS)}.")
    return COMBINATIONS[name]


def _pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to ``rank`` (a layer whose combined rank is smaller than the adapter's)."""
    missing = rank - lora_a.shape[0]
    if missing <= 0:
        return lora_a, lora_b
    return (
        torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])]),
        torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1),
    )


def combine_cat(sources: list[Source], rank: int, options: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns)."""
    lora_a = torch.cat([s.lora_a.float() * (s.weight * s.scaling) for s in sources])
    lora_b = torch.cat([s.lora_b.float() for s in sources], dim=1)
    return _pad_rank(lora_a, lora_b, rank)


def factor_combination(merge: Callable[..., torch.Tensor]) -> Combiner:
    """Combine A's and B's separately (equal ranks): weight sign(w s) sqrt|w s| on A and sqrt|w s| on B, so that
    B_i A_i alone would come back as w_i s_i B_i A_i; cross terms make this an approximation."""

    def combine(sources: list[Source], rank: int, options: Options) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = [s.weight * s.scaling for s in sources]
        root = torch.tensor([math.sqrt(abs(w)) for w in scaled])
        sign = torch.tensor([1.0 if w >= 0 else -1.0 for w in scaled])
        kwargs = {"density": options.density, "majority_sign_method": options.majority_sign_method}
        lora_a = merge([s.lora_a.float() for s in sources], root * sign, **kwargs)
        lora_b = merge([s.lora_b.float() for s in sources], root, **kwargs)
        return lora_a, lora_b

    return combine


def svd_combination(merge: Callable[..., torch.Tensor]) -> Combiner:
    """Combine the full delta weights s_i B_i A_i with ``merge`` (weights w_i), then truncate by SVD:
    B = U_r S_r, A = Vh_r; optionally clamp both to the ``svd_clamp`` quantile of their entries."""

    def combine(sources: list[Source], rank: int, options: Options) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = [delta_matrix(s.lora_a, s.lora_b, s.scaling) for s in sources]  # (out, in) float32 each
        weights = torch.tensor([s.weight for s in sources])
        delta = merge(deltas, weights, density=options.density, majority_sign_method=options.majority_sign_method)
        u, s, vh = torch.linalg.svd(delta, full_matrices=options.svd_full_matrices, driver=options.svd_driver)
        k = min(rank, s.numel())
        lora_b, lora_a = u[:, :k] * s[:k], vh[:k]  # (out, k) = U_k diag(S_k), (k, in)
        if options.svd_clamp is not None:
            bound = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), options.svd_clamp)
            lora_b, lora_a = lora_b.clamp(-bound, bound), lora_a.clamp(-bound, bound)
        return _pad_rank(lora_a, lora_b, rank)

    return combine


register_combination("cat", Combination(combine_cat, rank="sum"))
for _name, _merge, _density in (
    ("linear", ops.task_arithmetic, False),
    ("ties", ops.ties, True),
    ("dare_linear", ops.dare_linear, True),
    ("dare_ties", ops.dare_ties, True),
    ("magnitude_prune", ops.magnitude_prune, True),
):
    register_combination(_name, Combination(factor_combination(_merge), rank="equal", needs_density=_density))
    svd_name = "svd" if _name == "linear" else f"{_name}_svd"
    register_combination(svd_name, Combination(svd_combination(_merge), rank="svd", needs_density=_density))
