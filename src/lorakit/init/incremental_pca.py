"""Incremental PCA for EVA, batched over layers: every layer whose update has the same shape is fitted in one call.

The per-layer math is scikit-learn's IncrementalPCA (Ross et al. 2008, incremental mean/variance by Chan et al.)
with a randomised SVD (Halko et al., arXiv:0909.4061; ``torch.svd_lowrank`` with q = 2k, 4 iterations, seed 42),
the variant PEFT uses for EVA. Because ``torch.svd_lowrank`` draws one random test matrix per call that depends
only on the matrix shape, fitting L stacked layers under a fixed seed gives each layer the result it would get
alone; what batching changes is the number of kernel launches (one per group instead of one per layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SVD_SEED = 42
SVD_NITER = 4
MAX_GROUP_ELEMENTS = 1 << 28
"""Stacked update matrices are split into chunks of at most this many elements (bounds float64 scratch memory)."""


@dataclass
class PcaState:
    """Running PCA of one layer's inputs; tensors are (d,) or (k, d)."""

    n_components: int
    n_seen: int = 0
    mean: torch.Tensor | None = None  # (d,) float64
    var: torch.Tensor | None = None  # (d,) float64
    components: torch.Tensor | None = None  # (k, d), rows are principal directions
    singular_values: torch.Tensor | None = None  # (k,)
    explained_variance_ratio: torch.Tensor | None = None  # (k,)
    converged: torch.Tensor = field(default=None)  # (k,) bool on CPU: component stable between two updates

    def __post_init__(self) -> None:
        if self.converged is None:
            self.converged = torch.zeros(self.n_components, dtype=torch.bool)

    @property
    def fitted(self) -> bool:
        return self.components is not None


def partial_fit_many(states: list[PcaState], inputs: list[torch.Tensor], tau: float) -> None:
    """One incremental PCA step per layer: ``inputs[i]`` (n_i, d_i) updates ``states[i]`` in place.

    Layers sharing (shape, device, k, first-step) are stacked and fitted together. A component counts as converged
    when its cosine similarity with the previous step's is >= ``tau``.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (state, x) in enumerate(zip(states, inputs)):
        groups[(tuple(x.shape), x.device, state.n_components, state.fitted)].append(i)
    for (shape, _, _, _), members in groups.items():
        per_chunk = max(1, MAX_GROUP_ELEMENTS // max(1, 2 * math.prod(shape)))
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            _fit_stacked([states[i] for i in chunk], torch.stack([inputs[i] for i in chunk]).float(), tau)


def _moments(x: torch.Tensor, states: list[PcaState]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Updated mean and variance (L, d) float64 and the new sample counts (L, 1) float64.

    Args:
        x: (L, n, d) float32, the new samples of L layers (the layers may have seen different numbers before).
    """
    n = x.shape[1]
    new_sum = x.sum(dim=1, dtype=torch.float64)  # (L, d)
    centred = x - (new_sum / n)[:, None, :]  # (L, n, d) float64
    correction = centred.sum(dim=1, dtype=torch.float64).square()
    new_unnormalised = centred.square_().sum(dim=1, dtype=torch.float64) - correction / n
    if not states[0].fitted:
        total = torch.full((len(states), 1), float(n), dtype=torch.float64, device=x.device)
        return new_sum / total, new_unnormalised / total, total
    last = torch.tensor([[float(s.n_seen)] for s in states], dtype=torch.float64, device=x.device)  # (L, 1)
    total = last + n
    last_sum = torch.stack([s.mean for s in states]) * last
    last_var = torch.stack([s.var for s in states])
    ratio = last / n
    unnormalised = last_var * last + new_unnormalised + ratio / total * (last_sum / ratio - new_sum).square()
    return (last_sum + new_sum) / total, unnormalised / total, total


def _fit_stacked(states: list[PcaState], x: torch.Tensor, tau: float) -> None:
    """Incremental PCA step for L layers at once. x: (L, n, d) float32."""
    k = states[0].n_components
    n = x.shape[1]
    previous_components = [st.components for st in states]
    mean, var, total = _moments(x, states)
    if not states[0].fitted:
        x -= mean[:, None, :]
        data = x  # (L, n, d)
    else:
        last = total - n  # (L, 1)
        batch_mean = x.mean(dim=1)  # (L, d)
        x -= batch_mean[:, None, :]
        last_mean = torch.stack([s.mean for s in states])
        correction = torch.sqrt((last / total) * n) * (last_mean - batch_mean)  # (L, d) float64
        previous = torch.stack([s.singular_values[:, None] * s.components for s in states])  # (L, k, d)
        data = torch.cat([previous, x, correction[:, None, :]], dim=1)  # (L, k + n + 1, d), float64 by promotion
    vt, s = _randomised_svd(data, 2 * k)
    ratio = s.square() / (var * total).sum(dim=-1, keepdim=True)  # (L, q)
    counts = total[:, 0].tolist()
    for i, st in enumerate(states):
        st.n_seen, st.mean, st.var = int(counts[i]), mean[i], var[i]
        st.components, st.singular_values, st.explained_variance_ratio = vt[i, :k], s[i, :k], ratio[i, :k]
    if previous_components[0] is not None:
        sim = F.cosine_similarity(vt[:, :k], torch.stack(previous_components).to(vt.dtype), dim=-1)  # (L, k)
        converged = (sim >= tau).cpu()
        for i, st in enumerate(states):
            st.converged = converged[i]


def _randomised_svd(data: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vt (L, q', d) with deterministic signs, S (L, q')) of each stacked matrix, from a seeded svd_lowrank."""
    on_cuda = data.device.type == "cuda"
    # seed (and afterwards restore) only the generator that svd_lowrank draws from
    with torch.random.fork_rng(devices=[data.device] if on_cuda else []):
        if on_cuda:
            with torch.cuda.device(data.device):
                torch.cuda.manual_seed(SVD_SEED)
        else:
            torch.random.default_generator.manual_seed(SVD_SEED)
        _, s, v = torch.svd_lowrank(data, q=q, niter=SVD_NITER)
    vt = v.mH  # (L, q', d)
    # sign convention: the largest-magnitude entry of every component is positive
    pivot = vt.gather(-1, vt.abs().argmax(dim=-1, keepdim=True))
    return vt * torch.sign(pivot), s
