"""Hotswapping: overwrite a loaded adapter's weights and scaling in place with another saved adapter's.

No module is created or replaced, so a ``torch.compile``d model keeps its graph: the parameters are the same tensors
with new values. Same API as ``peft.utils.hotswap``:

* ``prepare_model_for_compiled_hotswap(model, target_rank=..)`` (before compiling) zero-pads every factor to
  ``target_rank`` along its rank dimension (rows of A (r, in), columns of B (out, r); B A is unchanged) and pins each
  adapter's scaling in a 0-d tensor (``AdapterRecord.scaling_tensor``), so adapters of other ranks and alphas swap
  in without recompiling.
* ``hotswap_adapter(model, path, adapter_name)`` reads a saved adapter, checks it fits, and writes it over
  ``adapter_name``: factors are copied (a smaller rank into the leading slice, the rest zeroed), layers the new
  adapter does not target get zero factors, and each layer's r / lora_alpha / scaling become the new adapter's.

LoRA: arXiv:2106.09685.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..layers import LoraLayer
from ..targeting.patterns import rank_and_alpha

# factor containers and the dimension that holds the rank: A (r, in[, k..]) / B (out, r[, 1..])
RANK_DIM: dict[str, int] = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}
# config fields that change an adapter's output beyond its tensors, r and alpha: they must agree to swap
CONFIG_KEYS_TO_CHECK: tuple[str, ...] = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
_CHECK_COMPILED = ("error", "warn", "ignore")


_LORA_CONTAINERS = frozenset(LoraLayer.adapter_layer_names)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _pinnable(layer: LoraLayer) -> bool:
    """Layers whose forward takes a tensor scaling (``target_parameters`` wrappers pass it to addmm's alpha)."""
    from ..layers.param_wrapper import ParamWrapper

    return not isinstance(layer, ParamWrapper)


# ---------------------------------------------------------------------------------------------- preparation
def _padded(param: torch.Tensor, dim: int, target_rank: int) -> nn.Parameter:
    """``param`` zero-padded along ``dim`` to ``target_rank`` (a new Parameter, same dtype/device/requires_grad)."""
    shape = list(param.shape)
    shape[dim] = target_rank
    out = torch.zeros(shape, dtype=param.dtype, device=param.device)
    out.narrow(dim, 0, param.shape[dim]).copy_(param.detach())
    return nn.Parameter(out, requires_grad=param.requires_grad)


def _factor_items(layer: LoraLayer) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(container attr, adapter name, factor tensor) for every rank-carrying factor on ``layer``."""
    for attr in RANK_DIM:
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for name, item in container.items():
                yield attr, name, item.weight if isinstance(item, nn.Module) else item


def _check_target_rank(model: nn.Module, target_rank: int) -> None:
    """Refuse, before anything is padded, a target_rank below some adapter's rank."""
    for where, layer in _lora_layers(model):
        for attr, name, param in _factor_items(layer):
            rank = param.shape[RANK_DIM[attr]]
            if rank > target_rank:
                raise ValueError(
                    f"Cannot pad adapter {name!r} on {where} to target_rank={target_rank}: its rank is already "
                    f"{rank}. Pass a target_rank >= the largest rank of all adapters you will swap in."
                )


def _pad_factor(layer: LoraLayer, attr: str, name: str, target_rank: int) -> None:
    """Pad one factor of adapter ``name`` in place of the old parameter (and fix the factor module's sizes)."""
    dim = RANK_DIM[attr]
    container = getattr(layer, attr)
    item = container[name]
    param = item.weight if isinstance(item, nn.Module) else item
    if param.shape[dim] == target_rank:
        return
    if isinstance(item, nn.Module):
        item.weight = _padded(param, dim, target_rank)
        sizes = ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")
        for size in sizes:
            if hasattr(item, size):
                setattr(item, size, target_rank)
    else:
        container[name] = _padded(param, dim, target_rank)


def _pad_layer(layer: LoraLayer, target_rank: int) -> bool:
    """Pad every adapter's factors on ``layer``; False when the layer has no paddable factors."""
    items = [(attr, name) for attr, name, _ in _factor_items(layer)]
    if not items or not _pinnable(layer):
        return False
    for attr, name in items:
        _pad_factor(layer, attr, name, target_rank)
    return True


def _check_groups(model: nn.Module) -> None:
    for where, layer in _lora_layers(model):
        groups = getattr(layer.get_base_layer(), "groups", 1)
        if groups > 1 and layer.adapters:
            raise NotImplementedError(
                f"Padding LoRA ranks on grouped conv {where} (groups={groups}) is not supported: zero rows would "
                "break the group layout. Use adapters of one rank there, or target_rank=None."
            )


def _check_compiled_arg(model: nn.Module, check_compiled: str) -> None:
    if check_compiled not in _CHECK_COMPILED:
        raise ValueError(f"check_compiled must be one of {list(_CHECK_COMPILED)}, got {check_compiled!r}.")
    if not _is_compiled(model) or check_compiled == "ignore":
        return
    if check_compiled == "error":
        raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model (torch.compile).")
    warnings.warn(
        "prepare_model_for_compiled_hotswap was called on a model that is already compiled; this will likely "
        "recompile it. Call it before torch.compile.",
        stacklevel=3,
    )


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make later hotswaps of adapters with other ranks / alphas recompile-free. Call after loading the first
    adapter and before ``torch.compile``.

    Every adapter's scaling becomes a 0-d tensor updated in place; with ``target_rank`` every factor is zero-padded
    to that rank (A: (r, in) -> (target_rank, in), B: (out, r) -> (out, target_rank); the delta B A is unchanged).
    ``config`` (one LoraConfig or ``PeftModel.peft_config``) gets r and rank_pattern set to ``target_rank`` so a
    save writes a config that fits the padded tensors.
    """
    _check_compiled_arg(model, check_compiled)
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}.")
    inner = _unwrap(model)
    if target_rank is not None:  # everything checked before anything is padded
        _check_target_rank(inner, target_rank)
        _check_groups(inner)
    found = False
    for _, layer in _lora_layers(inner):
        if not layer.adapters:
            continue
        found = True
        if target_rank is not None:
            _pad_layer(layer, target_rank)
        if _pinnable(layer):
            device = layer.weight.device
            for record in layer.adapters.values():
                record.pin_scaling(device)
    if not found:
        raise ValueError(
            "No LoRA adapter layers found in the model: call prepare_model_for_compiled_hotswap after loading the "
            "first adapter (and before compiling)."
        )
    if config is None or target_rank is None:
        return
    for lora_config in config.values() if isinstance(config, dict) else [config]:
        lora_config.r = target_rank
        lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern or {}, target_rank)


# ---------------------------------------------------------------------------------------------- swapping
def check_hotswap_configs_compatible(config0: LoraConfig, config1: LoraConfig) -> None:
    """Raise unless the two configs agree on every setting (besides r / alpha) that shapes the output."""
    type0, type1 = str(getattr(config0, "peft_type", "LORA")), str(getattr(config1, "peft_type", "LORA"))
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types for hotswapping: {type0} and {type1}.")
    for key in CONFIG_KEYS_TO_CHECK:
        val0, val1 = getattr(config0, key, None), getattr(config1, key, None)
        if val0 != val1:
            raise ValueError(
                f"Configs are incompatible for hotswapping: {key} is {val0!r} in the loaded adapter but "
                f"{val1!r} in the new one."
            )


def _user_model_prefix(model: nn.Module) -> str:
    from ..io.state_dict import model_prefix

    return model_prefix(model)


def _adapter_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """In-memory state-dict keys -> live tensors of adapter ``adapter_name``'s LoRA factors (and lora_B biases,
    DoRA magnitudes)."""
    out: dict[str, torch.Tensor] = {}
    for where, layer in _lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            params = item.named_parameters() if isinstance(item, nn.Module) else [("", item)]
            for pname, param in params:
                key = f"{where}.{attr}.{adapter_name}" + (f".{pname}" if pname else "")
                out[key] = param
    return out


def _check_fits(key: str, old: torch.Tensor, new: torch.Tensor, prepared: bool) -> None:
    """Raise unless ``new`` can be written over ``old``: same shape, or a smaller rank along the rank dimension
    (then zero-padded), or a larger rank on a model that was not prepared/compiled (then the parameter grows)."""
    if old.shape == new.shape:
        return
    attr = key.rsplit(".", 3)[-3] if key.endswith((".weight", ".bias")) else key.rsplit(".", 2)[-2]
    dim = RANK_DIM.get(attr)
    others_equal = (
        dim is not None
        and old.dim() == new.dim()
        and all(o == n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != dim)
    )
    if not others_equal:
        raise ValueError(
            f"Cannot hotswap {key}: the new adapter's tensor has shape {tuple(new.shape)}, the loaded one "
            f"{tuple(old.shape)}; only the rank may differ. Was the new adapter trained on another base model?"
        )
    if new.shape[dim] > old.shape[dim] and prepared:
        raise ValueError(
            f"Cannot hotswap {key}: the new adapter has rank {new.shape[dim]}, larger than the {old.shape[dim]} of "
            "the prepared (or compiled) model, whose parameters cannot grow. Call prepare_model_for_compiled_hotswap "
            "before compiling, with target_rank >= the largest rank of the adapters to swap in."
        )


def _write(key: str, old: torch.Tensor, new: torch.Tensor) -> None:
    new = new.to(device=old.device, dtype=old.dtype)
    if old.shape == new.shape:
        old.copy_(new)
        return
    attr = key.rsplit(".", 3)[-3] if key.endswith((".weight", ".bias")) else key.rsplit(".", 2)[-2]
    dim = RANK_DIM[attr]
    if new.shape[dim] < old.shape[dim]:
        old.zero_()
        old.narrow(dim, 0, new.shape[dim]).copy_(new)
    else:  # growing the rank: only on an unprepared, uncompiled model (checked), so a new shape is fine
        old.data = new.clone()


def _update_records(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Each layer's record takes the new adapter's r and alpha (rank_pattern / alpha_pattern), runtime scale 1."""
    prefix = _user_model_prefix(model)
    for where, layer in _lora_layers(model):
        record = layer.adapters.get(adapter_name)
        if record is None:
            continue
        r, alpha = rank_and_alpha(config, where.removeprefix(prefix))
        record.r, record.lora_alpha, record.scale = r, alpha, 1.0
        record.sync_scaling()


def _resize_modules(model: nn.Module, adapter_name: str) -> None:
    """After a rank grew, fix the factor modules' in/out sizes so their repr and checks agree with the weights."""
    for _, layer in _lora_layers(model):
        for attr, dim in RANK_DIM.items():
            container = getattr(layer, attr, None)
            item = container[adapter_name] if container is not None and adapter_name in container else None
            if not isinstance(item, nn.Module):
                continue
            rank = item.weight.shape[dim]
            for size in ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels"):
                if hasattr(item, size):
                    setattr(item, size, rank)


def _is_lora_key(key: str, prefix: str) -> bool:
    """A LoRA tensor's key has one of the LoRA layers' container names (``lora_A``, ..., ``lora_magnitude_vector``)
    as a path component, not merely a component starting with ``prefix`` (a base module named ``lora_proj``)."""
    parts = key.split(".")[:-1]
    return any(part in _LORA_CONTAINERS and part.startswith(prefix) for part in parts)


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Write ``state_dict`` (in-memory keys naming ``adapter_name``, as ``to_memory_keys`` gives) over the loaded
    adapter ``adapter_name``; everything is checked before anything is written."""
    inner = _unwrap(model)
    owners = sorted({n for _, layer in _lora_layers(inner) for n in layer.adapters})
    if adapter_name not in owners:
        raise ValueError(f"Cannot hotswap adapter {adapter_name!r}: no such adapter is loaded; loaded: {owners}.")
    merged = [w for w, layer in _lora_layers(inner) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Cannot hotswap adapter {adapter_name!r}: it is merged into the base weights of {merged[0]}"
            + (f" and {len(merged) - 1} more layers" if len(merged) > 1 else "")
            + "; call unmerge_adapter() first."
        )
    live = _adapter_params(inner, adapter_name)
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    other = sorted(k for k in state_dict if not _is_lora_key(k, parameter_prefix))
    if other:
        raise ValueError(
            f"Cannot hotswap adapter {adapter_name!r}: only LoRA tensors can be swapped, but the new adapter also "
            f"has {len(other)} others (biases, modules_to_save, trainable tokens), e.g. {other[0]!r}."
        )
    unexpected = sorted(k for k in state_dict if k not in live)
    if unexpected:
        targeted = sorted({k.rsplit(f".{parameter_prefix}", 1)[0] for k in live})
        raise ValueError(
            f"Cannot hotswap adapter {adapter_name!r}: the new adapter targets modules the loaded one does not "
            f"({len(unexpected)} tensors, e.g. {unexpected[0]!r}); the loaded adapter targets: {', '.join(targeted)}."
        )
    prepared = _is_compiled(model) or any(
        rec.scaling_tensor is not None
        for _, layer in _lora_layers(inner)
        for n, rec in layer.adapters.items()
        if n == adapter_name
    )
    for key, new in state_dict.items():
        _check_fits(key, live[key], new, prepared)
    with torch.no_grad():
        for key, param in live.items():
            if key not in state_dict:  # a layer the new adapter leaves alone contributes nothing
                param.zero_()
        for key, new in state_dict.items():
            _write(key, live[key], new)
    _resize_modules(inner, adapter_name)
    _update_records(inner, adapter_name, config)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Replace the weights and scalings of loaded adapter ``adapter_name`` with the saved adapter at
    ``model_name_or_path`` (a folder or Hub id), in place; the name stays. The adapters must target the same
    modules and agree on use_rslora, lora_dropout, alpha_pattern and use_dora.

    ``model`` is a PeftModel (or its ``torch.compile`` wrapper). Hub kwargs (subfolder, revision, cache_dir,
    token) are passed to the download.
    """
    from ..io.checkpoint import HUB_KWARGS, read_adapter_weights
    from ..io.state_dict import to_memory_keys

    inner = _unwrap(model)
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments for hotswap_adapter: {sorted(kwargs)}.")
    peft_config = getattr(inner, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config:
        loaded = sorted(peft_config) if isinstance(peft_config, dict) else []
        raise ValueError(f"Cannot hotswap adapter {adapter_name!r}: no such adapter is loaded; loaded: {loaded}.")
    config = LoraConfig.from_pretrained(model_name_or_path, **hub)
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    tensors = read_adapter_weights(model_name_or_path, device=torch_device or "cpu", **hub)
    memory = to_memory_keys(inner, tensors, adapter_name)
    hotswap_adapter_from_state_dict(model, memory, adapter_name, config)
