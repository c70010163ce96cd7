"""Task-vector merging functions on stacked tensors: task arithmetic (arXiv:2212.04089), TIES (arXiv:2306.01708),
DARE (arXiv:2311.03099) and magnitude pruning. Every function takes the per-adapter tensors (all of one shape) and
per-adapter weights and returns one tensor of that shape; they are used on LoRA factors and on full delta weights.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, *shape) * (n,) broadcast over the trailing dims."""
    return stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1))).to(stacked)


def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().reshape(-1).topk(keep).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the survivors by it (same expectation)."""
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * keep / density


def _prune_all(tensors: list[torch.Tensor], density: float, pruner) -> list[torch.Tensor]:
    if density >= 1:
        warnings.warn(f"density={density} keeps every entry; nothing is pruned.", stacklevel=4)
        return tensors
    return [pruner(t, density) for t in tensors]


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES sign election over dim 0: the sign of the sum ("total") or of the sum of signs ("frequency"); True where
    an entry agrees with it (ties count as positive)."""
    signs = stacked.sign()
    votes = {"total": stacked, "frequency": signs}[method].sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor, **_: object) -> torch.Tensor:
    """sum_i w_i t_i."""
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, *, density: float, **_: object) -> torch.Tensor:
    """Task arithmetic on magnitude-pruned tensors."""
    return task_arithmetic(_prune_all(tensors, density, magnitude_prune_tensor), weights)


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, *, density: float, **_: object) -> torch.Tensor:
    """Task arithmetic on randomly dropped and rescaled tensors."""
    return task_arithmetic(_prune_all(tensors, density, random_prune_tensor), weights)


def _ties_merge(pruned: list[torch.Tensor], weights: torch.Tensor, method: SignMethod) -> torch.Tensor:
    stacked = torch.stack(pruned)
    return disjoint_mean(_weighted(stacked, weights), majority_sign_mask(stacked, method))


def ties(
    tensors: list[torch.Tensor], weights: torch.Tensor, *, density: float, majority_sign_method: SignMethod = "total"
) -> torch.Tensor:
    """Trim to ``density`` by magnitude, elect signs on the trimmed tensors, mean the weighted agreeing entries."""
    return _ties_merge(_prune_all(tensors, density, magnitude_prune_tensor), weights, majority_sign_method)


def dare_ties(
    tensors: list[torch.Tensor], weights: torch.Tensor, *, density: float, majority_sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES with DARE's random drop-and-rescale in place of magnitude trimming."""
    return _ties_merge(_prune_all(tensors, density, random_prune_tensor), weights, majority_sign_method)
