"""A peft LoRA Linear seen through the attributes lorakit's kernels read, without copying anything.

lorakit's fast paths (``kernels.linear_dispatch``, ``kernels.mixed_dispatch``, ``kernels.shared_inputs``,
``kernels.dora_batch``) read a LoRA layer's submodules from ``layer.__dict__["_modules"]`` and a few attributes:
``adapters`` (one record per adapter: ``scaling``, ``lora_bias``, ``variant``), ``_active_adapters``,
``_disable_adapters``, ``merged_adapters``, ``fan_in_fan_out``, ``in_features`` / ``out_features``, ``layer_kind``.
``PeftLayerView`` answers each of them from the peft layer's own state at the moment it is read: its ``_modules`` is
the peft layer's very dict (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``, ``lora_magnitude_vector``, the
same parameter objects), and its properties read peft's ``scaling``, ``lora_bias``, ``lora_variant``,
``_active_adapter``, ``_disable_adapters`` and ``merged_adapters``. So set_adapter, merge, disable_adapter, a new
adapter or a rescale take effect on the next call. The view keeps the kernels' derived caches (cast factors, adapter
stacks, DoRA's ||W||^2) in its own ``__dict__``; they are keyed by parameter identity and version, as on lorakit's
own layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .dora import PeftDora

if TYPE_CHECKING:
    from .versions import PeftApi

VIEW_KEY = "_lorakit_peft_view"
"""Where a patched peft layer keeps its view (dropped when the layer is pickled or deep-copied)."""


class OtherVariant:
    """Stands for any peft variant but DoRA on a Linear (aLoRA, MiCA, ...): it has no fused node, so the kernels
    leave the adapter to peft's forward (``fused_linear`` absent; not stackable for mixed batches)."""

    name = "peft-variant"


OTHER_VARIANT = OtherVariant()


class PeftAdapterRecord:
    """One peft adapter as lorakit's ``AdapterRecord`` fields the kernels read, live from the peft layer."""

    scaling_tensor = None  # peft keeps scaling as a float

    def __init__(self, state: dict[str, Any], name: str, dora: PeftDora) -> None:
        self._state = state  # the peft layer's __dict__
        self._name = name
        self._dora = dora

    @property
    def scaling(self) -> float:
        return self._state["scaling"][self._name]

    @property
    def lora_bias(self) -> bool:
        return bool(self._state["lora_bias"].get(self._name, False))

    @property
    def variant(self) -> PeftDora | OtherVariant | None:
        """None for plain LoRA, the DoRA node for peft's ``DoraLinearVariant``, else ``OTHER_VARIANT``."""
        variant = self._state["lora_variant"].get(self._name)
        if variant is None:
            return None
        return self._dora if type(variant) is self._dora.api.dora_variant else OTHER_VARIANT


class PeftLayerView:
    """The lorakit-layer face of one peft ``lora.Linear`` (see the module docstring)."""

    layer_kind = "linear"

    def __init__(self, layer: nn.Module, api: PeftApi) -> None:
        self.__dict__["_modules"] = layer.__dict__["_modules"]  # the same dict: always the layer's current children
        self._state = layer.__dict__
        self._dora = PeftDora(api)
        self._records: dict[str, PeftAdapterRecord] = {}

    @property
    def adapters(self) -> dict[str, PeftAdapterRecord]:
        """One record per adapter of the layer (peft's ``lora_A`` keys, in order); a record lives as long as its
        adapter name, so the kernels' caches keyed by it stay valid until the adapter set changes."""
        names = self._modules["lora_A"]._modules
        records = self._records
        if list(records) != list(names):
            self._records = records = {
                n: records.get(n) or PeftAdapterRecord(self._state, n, self._dora) for n in names
            }
        return records

    @property
    def _active_adapters(self) -> list[str]:
        active = self._state["_active_adapter"]
        return [active] if isinstance(active, str) else list(active)

    @property
    def _disable_adapters(self) -> bool:
        return self._state["_disable_adapters"]

    @property
    def merged_adapters(self) -> list[str]:
        return self._state["merged_adapters"]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self._state["fan_in_fan_out"])

    @property
    def in_features(self) -> int:
        return self._state["in_features"]

    @property
    def out_features(self) -> int:
        return self._state["out_features"]

    @property
    def training(self) -> bool:
        return self._state["training"]

    @property
    def lora_A(self) -> nn.ModuleDict:
        return self._modules["lora_A"]

    @property
    def lora_B(self) -> nn.ModuleDict:
        return self._modules["lora_B"]


def layer_view(layer: nn.Module, api: PeftApi) -> PeftLayerView:
    """``layer``'s view, made on first use and kept in its ``__dict__`` (a copied layer makes its own)."""
    view = layer.__dict__.get(VIEW_KEY)
    if view is None or view._state is not layer.__dict__:
        view = layer.__dict__[VIEW_KEY] = PeftLayerView(layer, api)
    return view
