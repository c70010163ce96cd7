"""Arrow routing over a library of LoRA experts (arXiv:2405.11157), with GenKnowSub (arXiv:2505.10939), as a
variant of Linear / Conv1D layers.

The router is an adapter of its own (``arrow_router``, added by ``lorakit.create_arrow_model``) whose variant reads
the layer's other adapters, the experts, instead of its own factors. For each token x (in,):

    p_e   = top right singular vector of B_e A_e      (in,), per expert and layer, computed once and cached
    score = |x . p_e|                                 PEFT documents this as cosine similarity; it is not normalised
    c     = softmax(score / temperature) over the top_k experts of the token, 0 for the others
    delta = sum_e c_e s_e B_e A_e x                   s_e: the expert's scaling on this layer

computed for all tokens at once with the experts' factors stacked (no loop over experts or tokens). As in PEFT, the
router's own dropout acts on ``delta``, the experts' dropout is not used, and the router's own A and B are unused.

GenKnowSub (``use_gks``): before an expert is first routed to, the mean of the general adapters' A and of their B is
subtracted from the expert's A and B, in place and once per expert.

Experts are the adapters on the layer other than routers and the general adapters: the config's
``task_adapter_names`` first, then any adapter added later (as PEFT, which also routes to adapters loaded after
``create_arrow_model``). Prototypes are recomputed when the experts or their weights change.

Prototypes are exact (an SVD of the r x in matrix R A, where B = Q R), where PEFT runs 15 power iterations from a
random start seeded by ``rng_seed``. The two agree when B A has a spectral gap (trained adapters usually do); with
near-equal top singular values PEFT's vector is a seed-dependent mix. ``rng_seed`` therefore changes nothing here:
the prototypes are deterministic without it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..layers.variant import UnmergeableVariant
from . import register_variant

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layers.base import LoraLayer

SUPPORTED_KINDS = ("linear",)


# ---------------------------------------------------------------------- the math, as pure functions
def arrow_prototypes(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each expert's B A, without forming B A.

    Args:
        lora_a: (E, r, in)
        lora_b: (E, out, r)
    Returns:
        (E, in) float32 unit vectors (sign arbitrary); a zero vector for an expert whose B A is zero
    """
    a32, b32 = lora_a.detach().float(), lora_b.detach().float()
    # B = Q R with orthonormal Q, so B A = Q (R A) has the right singular vectors and values of R A
    r_factor = torch.linalg.qr(b32, mode="r").R  # (E, min(out, r), r)
    _, singular, vh = torch.linalg.svd(r_factor @ a32, full_matrices=False)  # vh: (E, min(out, r), in)
    return vh[:, 0, :] * (singular[:, :1] > 0)


def arrow_coefficients(tokens: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Per-token expert weights: softmax(|x . p_e| / temperature) over the token's top_k experts.

    Args:
        tokens: (t, in)
        prototypes: (E, in)
    Returns:
        (t, E), rows sum to 1, exactly top_k non-zero entries per row
    """
    scores = (tokens @ prototypes.T).abs()  # (t, in) @ (in, E) -> (t, E)
    kept, index = scores.topk(top_k, dim=-1)  # (t, k)
    return torch.zeros_like(scores).scatter(-1, index, torch.softmax(kept / temperature, dim=-1))


def arrow_delta(
    tokens: torch.Tensor,
    coefficients: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """sum_e c_e s_e B_e A_e x for every token, as one rank-(E r) LoRA whose rank blocks are gated per token.

    Args:
        tokens: (t, in)
        coefficients: (t, E)
        lora_a: (E, r, in)
        lora_b: (E, out, r)
        scales: (E,)
    Returns:
        (t, out)
    """
    n_experts, rank, _ = lora_a.shape
    low = tokens @ lora_a.reshape(n_experts * rank, -1).T  # (t, in) @ (in, E r) -> (t, E r)
    gate = (coefficients * scales).repeat_interleave(rank, dim=-1)  # (t, E) -> (t, E r)
    lifted = lora_b.transpose(1, 2).reshape(n_experts * rank, -1)  # (E, r, out) -> (E r, out)
    return (low * gate) @ lifted  # (t, E r) @ (E r, out) -> (t, out)


# ---------------------------------------------------------------------- the variant
@dataclass
class ArrowRouting:
    """One routing decision of a layer: which experts, how much of each per token, and their stacked factors."""

    experts: list[str]
    coefficients: torch.Tensor  # (t, E)
    tokens: torch.Tensor  # (t, in), in the experts' dtype
    lora_a: torch.Tensor  # (E, r, in)
    lora_b: torch.Tensor  # (E, out, r)
    scales: torch.Tensor  # (E,)

    def delta(self) -> torch.Tensor:
        """(t, out): sum_e c_e s_e B_e A_e x."""
        return arrow_delta(self.tokens, self.coefficients, self.lora_a, self.lora_b, self.scales)


class ArrowVariant(UnmergeableVariant):
    """The Arrow router on one Linear layer: picks the experts, applies GenKnowSub once, caches the prototypes,
    routes every token."""

    name = "arrow"
    supports_mixed_batch = True  # routing is per token, so any subset of rows is routed the same

    def __init__(self, layer: LoraLayer, config: LoraConfig) -> None:
        if layer.layer_kind not in SUPPORTED_KINDS:
            raise ValueError(
                f"Arrow routing (arrow_config) supports only Linear / Conv1D layers; {type(layer).__name__} over "
                f"{type(layer.get_base_layer()).__name__} is of kind {layer.layer_kind!r}. Remove it from "
                "target_modules."
            )
        arrow = config.arrow_config
        self.top_k = int(arrow.top_k)
        self.temperature = float(arrow.router_temperature)
        self.use_gks = bool(arrow.use_gks)
        self.task_adapter_names = list(arrow.task_adapter_names or [])
        self.gks_adapter_names = list(arrow.gks_adapter_names or [])
        self._subtracted: weakref.WeakSet = weakref.WeakSet()  # experts' lora_A modules GenKnowSub has changed
        self._prototype_key: tuple | None = None
        self._prototypes: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ArrowVariant(top_k={self.top_k}, router_temperature={self.temperature}, use_gks={self.use_gks}, "
            f"task_adapter_names={self.task_adapter_names}, gks_adapter_names={self.gks_adapter_names})"
        )

    # ------------------------------------------------------------------ experts
    def experts(self, layer: LoraLayer) -> list[str]:
        """The adapters this router mixes on ``layer``, in routing order (columns of the coefficients)."""
        excluded = set(self.gks_adapter_names)
        excluded |= {n for n, rec in layer.adapters.items() if isinstance(rec.variant, ArrowVariant)}
        ordered = dict.fromkeys([*self.task_adapter_names, *layer.adapters])
        return [n for n in ordered if n in layer.adapters and n not in excluded]

    def _checked_experts(self, layer: LoraLayer) -> list[str]:
        names = self.experts(layer)
        if len(names) < self.top_k:
            raise ValueError(
                f"Arrow routes each token to top_k={self.top_k} experts, but the layer over "
                f"{type(layer.get_base_layer()).__name__}({layer.in_features} -> {layer.out_features}) has only "
                f"{len(names)}: {names} (adapters there: {sorted(layer.adapters)}). Lower top_k or add experts."
            )
        for name in names:
            record = layer.adapters[name]
            if record.variant is not None or record.lora_bias:
                what = f"the {record.variant.name!r} variant" if record.variant is not None else "lora_bias"
                raise ValueError(f"Arrow expert {name!r} uses {what}; Arrow mixes plain LoRA experts only.")
        general = [n for n in self._general_names() if n in layer.adapters]
        ranks = {name: layer.adapters[name].r for name in names + general}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"Arrow needs experts (and general adapters) of equal rank on a layer; got ranks {ranks}.")
        return names

    def _general_names(self) -> list[str]:
        return self.gks_adapter_names if self.use_gks else []

    # ------------------------------------------------------------------ GenKnowSub
    @torch.no_grad()
    def _subtract_general_knowledge(self, layer: LoraLayer, experts: list[str]) -> None:
        """A_e -= mean_g A_g and B_e -= mean_g B_g for every expert not yet done (arXiv:2505.10939)."""
        if not self.use_gks:
            return
        pending = [n for n in experts if layer.lora_A[n] not in self._subtracted]
        if not pending:
            return
        general = self.gks_adapter_names
        missing = [n for n in general if n not in layer.adapters]
        if not general or missing:
            raise ValueError(
                f"use_gks=True needs the general adapters {general or '(none given)'} on every routed layer; "
                f"missing here: {missing or general}; adapters on this layer: {sorted(layer.adapters)}."
            )
        mean_a = torch.stack([layer.lora_A[n].weight for n in general]).mean(0)  # (r, in)
        mean_b = torch.stack([layer.lora_B[n].weight for n in general]).mean(0)  # (out, r)
        for name in pending:
            layer.lora_A[name].weight.sub_(mean_a.to(layer.lora_A[name].weight))
            layer.lora_B[name].weight.sub_(mean_b.to(layer.lora_B[name].weight))
            self._subtracted.add(layer.lora_A[name])

    # ------------------------------------------------------------------ routing
    def _cached_prototypes(
        self, experts: list[str], lora_a: torch.Tensor, lora_b: torch.Tensor, weights: list[torch.Tensor]
    ) -> torch.Tensor:
        """(E, in) prototypes in A's dtype; recomputed only when the experts or their weights changed."""
        key = (tuple(experts), tuple((w.data_ptr(), 0 if w.is_inference() else w._version) for w in weights))
        if key != self._prototype_key or self._prototypes is None:
            self._prototypes = arrow_prototypes(lora_a, lora_b).to(lora_a.dtype)
            self._prototype_key = key
        return self._prototypes

    def route(self, layer: LoraLayer, x: torch.Tensor) -> ArrowRouting:
        """Route the tokens of ``x`` (..., in) on ``layer``: t = x.numel() // in tokens over E experts."""
        experts = self._checked_experts(layer)
        self._subtract_general_knowledge(layer, experts)
        a_weights = [layer.lora_A[n].weight for n in experts]
        b_weights = [layer.lora_B[n].weight for n in experts]
        lora_a, lora_b = torch.stack(a_weights), torch.stack(b_weights)  # (E, r, in), (E, out, r)
        prototypes = self._cached_prototypes(experts, lora_a, lora_b, a_weights + b_weights)
        tokens = x.to(lora_a.dtype).reshape(-1, x.shape[-1])  # (t, in)
        scales = torch.tensor([layer.adapters[n].scaling for n in experts], dtype=lora_a.dtype, device=lora_a.device)
        coefficients = arrow_coefficients(tokens, prototypes, self.top_k, self.temperature)
        return ArrowRouting(experts, coefficients, tokens, lora_a, lora_b, scales)

    # ------------------------------------------------------------------ protocol
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """The router has no parameters of its own; experts are read at forward time."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the routed mixture of the experts.

        Args:
            x: (..., in)
            result: (..., out), the output so far
        Returns:
            same shape and dtype as ``result``
        """
        delta = self.route(layer, x).delta()  # (t, out)
        delta = layer.lora_dropout[adapter_name](delta)  # as PEFT: the router's dropout acts on the output
        return (result + delta.reshape(result.shape)).to(result.dtype)  # one rounding, as PEFT

    def check_mergeable(self, layer: LoraLayer, adapter_name: str) -> None:
        raise ValueError(
            f"Arrow router {adapter_name!r} cannot be merged: it mixes its experts differently for every token, so "
            "no single weight reproduces it. Keep it unmerged, or merge a task adapter instead."
        )


register_variant("arrow", lambda c: c.arrow_config is not None, ArrowVariant)
