"""get_layer_status / get_model_status: what every adapter module of a model is doing, as PEFT reports it.

Same dataclasses and semantics as PEFT's (``peft.get_layer_status`` / ``peft.get_model_status``): one
``TunerLayerStatus`` per adapter module (LoRA layers, modules_to_save wrappers, trainable-token adapters), and a
``TunerModelStatus`` that folds them, writing ``"irregular"`` where layers disagree (a model in an inconsistent
state, e.g. an adapter merged on some layers only).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..layers import LoraLayer
from ..tokens.adapter import TokenAdapter
from .modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]

# lorakit layer class -> PEFT's quantization_backend name
_QUANT_BACKENDS: dict[str, str] = {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


# ---------------------------------------------------------------------------------------------- per module kind
def _params_of(item: nn.Module | torch.Tensor) -> list[torch.Tensor]:
    return list(item.parameters()) if isinstance(item, nn.Module) else [item]


def _lora_params(layer: LoraLayer) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for name, item in container.items():
                out[name].extend(_params_of(item))
    return out


def _lora_type(layer: LoraLayer) -> str:
    from ..layers.conv import Conv

    kind = type(layer.get_base_layer()).__name__ if isinstance(layer, Conv) else type(layer).__name__
    return f"lora.{kind}"


def _lora_status(name: str, layer: LoraLayer, parent: nn.Module | None) -> TunerLayerStatus:
    return _status(
        name,
        _lora_type(layer),
        layer,
        _lora_params(layer),
        list(layer.merged_adapters),
        _QUANT_BACKENDS.get(type(layer).__name__),
    )


def _saved_status(name: str, wrapper: ModulesToSaveWrapper, parent: nn.Module | None) -> TunerLayerStatus:
    params = {n: list(m.parameters()) for n, m in wrapper.modules_to_save.items()}
    return _status(name, "ModulesToSaveWrapper", wrapper, params, [], None)


def _tokens_status(name: str, adapter: TokenAdapter, wrapper: nn.Module | None) -> TunerLayerStatus:
    """Reported under ``<path>.token_adapter`` as PEFT's TrainableTokensLayer; the lifecycle (active, enabled,
    merged) lives on the lorakit wrapper around it."""
    params = {n: [p] for n, p in adapter.trainable_tokens_delta.items()}
    owner = wrapper if wrapper is not None else adapter
    merged = list(getattr(owner, "merged_adapters", []))
    return _status(name, "TrainableTokensLayer", owner, params, merged, None)


# module type -> status builder (name, module, parent module)
STATUS_BUILDERS: list[tuple[type, Callable[[str, nn.Module, nn.Module | None], TunerLayerStatus]]] = [
    (LoraLayer, _lora_status),
    (ModulesToSaveWrapper, _saved_status),
    (TokenAdapter, _tokens_status),
]


def _grad_state(values: Iterable[bool]) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _status(
    name: str,
    module_type: str,
    owner: nn.Module,
    params: dict[str, list[torch.Tensor]],
    merged: list[str],
    quantization_backend: str | None,
) -> TunerLayerStatus:
    return TunerLayerStatus(
        name=name,
        module_type=module_type,
        enabled=not owner.disable_adapters,
        active_adapters=list(owner.active_adapters),
        merged_adapters=merged,
        requires_grad={n: _grad_state(p.requires_grad for p in ps) for n, ps in params.items()},
        available_adapters=sorted(params),
        devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
        quantization_backend=quantization_backend,
    )


# ---------------------------------------------------------------------------------------------- model level
def _is_peft_model(model: nn.Module) -> bool:
    from ..peft_model import PeftModel

    return isinstance(model, PeftModel)


def _adapter_root(model: nn.Module) -> nn.Module:
    """Names are relative to the LoraModel in a PeftModel (as PEFT's, which walk ``base_model``)."""
    return model.base_model if _is_peft_model(model) else model


def _walk(root: nn.Module) -> Iterator[TunerLayerStatus]:
    modules = dict(root.named_modules())
    for name, module in modules.items():
        for kind, build in STATUS_BUILDERS:
            if isinstance(module, kind):
                parent = modules.get(name.rpartition(".")[0]) if "." in name else root
                yield build(name, module, parent)
                break


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter module of ``model`` (a PeftModel, a LoraModel or a model with adapters
    injected in place), in module order."""
    status = list(_walk(_adapter_root(model)))
    if not status:
        raise ValueError(
            f"No adapter layers found in the {type(model).__name__}: make sure it is a PeftModel or has LoRA adapters "
            "injected (get_peft_model / inject_adapter_in_model)."
        )
    return status


def _agreed(values: set, empty=None):
    """The single value all layers share, else "irregular" (``empty`` when there are none)."""
    if not values:
        return empty
    return next(iter(values)) if len(values) == 1 else "irregular"


def _active(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    active = _agreed({tuple(s.active_adapters) for s in layers}, empty=())
    return active if active == "irregular" else list(active)


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged on some layer; "irregular" if one of them is present but unmerged on another layer."""
    merged = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged:
            return "irregular"
    return sorted(merged)


def _model_identity(model: nn.Module) -> tuple[str, str, dict[str, str]]:
    """(base_model_type, adapter_model_type, peft_types) as PEFT names them."""
    if _is_peft_model(model):
        types = {n: getattr(c.peft_type, "value", str(c.peft_type)) for n, c in model.peft_config.items()}
        return type(model.get_base_model()).__name__, type(model.base_model).__name__, types
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return type(model).__name__, "None", {}
    return "other", "None", {}


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, folded over ``get_layer_status``."""
    from ..peft_model import PeftModel

    base_type, adapter_type, peft_types = _model_identity(model)
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    layers = get_layer_status(model)
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, val in s.requires_grad.items():
            grads[key].append(val)
        for key, val in s.devices.items():
            devices[key].update(val)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agreed({s.enabled for s in layers}),
        active_adapters=_active(layers),
        merged_adapters=_merged(layers),
        requires_grad={key: _grad_state(vals) for key, vals in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(val) for key, val in devices.items()},
        quantization_backend=_agreed({s.quantization_backend for s in layers}),
    )
