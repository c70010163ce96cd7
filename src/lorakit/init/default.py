"""The basic initialisations: True (kaiming-uniform A, zero B), 'gaussian' and False."""

from __future__ import annotations

import math

import torch

from .registry import InitRequest, InitResult, register_init


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    """nn.Linear's default: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@register_init(True)
def init_default(req: InitRequest) -> InitResult:
    """B = 0 so the adapter starts as a no-op. Embedding: A = 0, B ~ N(0, 1) (the roles swap)."""
    if req.layer_kind == "embedding":
        return InitResult(torch.zeros(req.a_shape), torch.randn(req.b_shape, generator=req.generator))
    return InitResult(_kaiming_uniform(req.a_shape, req.generator), torch.zeros(req.b_shape))


@register_init("gaussian")
def init_gaussian(req: InitRequest) -> InitResult:
    """A ~ N(0, 1/r), B = 0 (Embedding as default)."""
    if req.layer_kind == "embedding":
        return init_default(req)
    a = torch.randn(req.a_shape, generator=req.generator) / req.rank
    return InitResult(a, torch.zeros(req.b_shape))


@register_init(False)
def init_random(req: InitRequest) -> InitResult:
    """No special init: both factors random (A as default, B kaiming too), so the adapter is not a no-op."""
    if req.layer_kind == "embedding":
        return InitResult(
            torch.randn(req.a_shape, generator=req.generator), torch.randn(req.b_shape, generator=req.generator)
        )
    return InitResult(_kaiming_uniform(req.a_shape, req.generator), _kaiming_uniform(req.b_shape, req.generator))
