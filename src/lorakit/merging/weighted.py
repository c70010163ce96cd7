"""add_weighted_adapter: a new adapter made from existing ones, per layer, with a registered combination type."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..config import LoraConfig
from .registry import Combination, Options, Source, get_combination

if TYPE_CHECKING:
    from ..layers import LoraLayer
    from ..model.lora_model import LoraModel


def _check_sources(model: LoraModel, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"Give one weight per adapter; got adapters {adapters} and weights {list(weights)}.")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"Adapter {unknown[0]} does not exist; existing adapters: {sorted(model.peft_config)}.")
    if adapter_name in model.peft_config:
        raise ValueError(
            f"Adapter name {adapter_name!r} already exists; existing adapters: {sorted(model.peft_config)}."
        )
    dora = [a for a in adapters if model.peft_config[a].use_dora]
    if dora:
        raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters (magnitude vectors): {dora}.")
    params = [a for a in adapters if model.peft_config[a].target_parameters]
    if params:  # as PEFT
        raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (adapters {params}).")
    tokens = [a for a in adapters if model.peft_config[a].trainable_token_indices is not None]
    if tokens:
        raise ValueError(f"add_weighted_adapter cannot combine trainable token rows (adapters {tokens}).")
    for wrapper in model._wrappers():
        owners = [a for a in adapters if a in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(
                f"Adapters {owners} each have their own copy of a modules_to_save module "
                f"({type(wrapper.original_module).__name__}); such copies cannot be combined."
            )


def _new_rank(model: LoraModel, adapters: list[str], combination: Combination, name: str, svd_rank: int | None) -> int:
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in (model.peft_config[a] for a in adapters)]
    if combination.rank == "equal":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type {name!r} needs adapters of equal rank; {adapters} have ranks {ranks}.")
        return ranks[0]
    if combination.rank == "sum":
        return sum(ranks)
    return svd_rank or max(ranks)


def _sources(layer: LoraLayer, adapters: list[str], weights: list[float]) -> list[Source]:
    sources = []
    for adapter, weight in zip(adapters, weights):
        if adapter in layer.adapters:
            lora_a, lora_b = layer._factors_2d(adapter)
            sources.append(Source(lora_a.detach(), lora_b.detach(), layer.adapters[adapter].scaling, float(weight)))
    return sources


def _combined_bias(layer: LoraLayer, adapters: list[str], weights: list[float]) -> torch.Tensor | None:
    """sum_i w_i s_i b_i over the sources with lora_bias (biases add exactly), or None."""
    terms = [
        layer.lora_B[a].bias.detach().float() * (w * layer.adapters[a].scaling)
        for a, w in zip(adapters, weights)
        if a in layer.adapters and layer.adapters[a].lora_bias
    ]
    return torch.stack(terms).sum(0) if terms else None


# inits that never touch the base weights; others (PiSSA, OLoRA, ...) would change the base when the new adapter is
# created. The factors are overwritten either way.
_PLAIN_INITS = (True, False, "gaussian")


def _new_config(model: LoraModel, adapters: list[str], rank: int, layers: list[str]) -> LoraConfig:
    """The first source's config, at scaling 1 (r = alpha, no rsLoRA, no patterns), on exactly the sources' layers,
    initialised plainly (values are written afterwards) and with the union of their modules_to_save."""
    configs = [model.peft_config[a] for a in adapters]
    modules_to_save = sorted({m for c in configs for m in (c.modules_to_save or [])}) or None
    return dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=layers,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        layer_replication=None,
        init_lora_weights=configs[0].init_lora_weights if configs[0].init_lora_weights in _PLAIN_INITS else True,
        bias="none",
        lora_bias=any(c.lora_bias for c in configs),
        modules_to_save=modules_to_save,
        inference_mode=False,
    )


def _copy_modules_to_save(model: LoraModel, adapters: list[str], adapter_name: str) -> None:
    for wrapper in model._wrappers():
        owner = next((a for a in adapters if a in wrapper.modules_to_save), None)
        if owner is not None and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())


def add_weighted_adapter(
    model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name`` = weighted combination of ``adapters`` (inactive; activate with set_adapter).

    A single source adapter is always combined linearly. See ``lorakit.merging.registry`` for the types.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_sources(model, adapters, weights, adapter_name)
    name = "linear" if len(adapters) == 1 else combination_type
    combination = get_combination(name)
    if combination.needs_density and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type {name!r} needs density in [0, 1], got {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    rank = _new_rank(model, adapters, combination, name, svd_rank)
    options = Options(density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
    layers = [(path, layer) for path, layer in model.lora_layers() if any(a in layer.adapters for a in adapters)]
    _check_layers(layers, adapters, combination, name, rank)
    with model.adding(adapter_name):
        model.inject_adapter(adapter_name, _new_config(model, adapters, rank, _target_paths(layers)))
        for _, layer in layers:
            lora_a, lora_b = combination.combine(_sources(layer, adapters, weights), rank, options)
            layer.set_factors_2d(adapter_name, lora_a, lora_b)
            bias = _combined_bias(layer, adapters, weights)
            if bias is not None:
                with torch.no_grad():
                    layer.lora_B[adapter_name].bias.copy_(bias)
        _copy_modules_to_save(model, adapters, adapter_name)
        model._apply_trainability()


def _target_paths(layers: list) -> list[str]:
    """The layers' paths, without the out_proj layers nested in a MultiheadAttention layer (not a target of their
    own: the attention layer adds each adapter to its out_proj)."""
    from ..layers.mha import MultiheadAttention

    owners = {path for path, layer in layers if isinstance(layer, MultiheadAttention)}
    return [path for path, _ in layers if path.rpartition(".base_layer.")[0] not in owners]


def _check_layers(layers: list, adapters: list[str], combination: Combination, name: str, rank: int) -> None:
    for path, layer in layers:
        if getattr(layer.get_base_layer(), "groups", 1) > 1:
            raise ValueError(f"add_weighted_adapter cannot combine adapters on the grouped conv {path!r}.")
        if combination.rank == "equal":
            ranks = {a: layer.adapters[a].r for a in adapters if a in layer.adapters}
            if any(r != rank for r in ranks.values()):
                raise ValueError(f"combination_type {name!r} needs equal ranks, but layer {path!r} has ranks {ranks}.")
