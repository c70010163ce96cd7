"""LoraLayer: wraps an original module as ``base_layer`` and adds named low-rank adapters to its output.

Layer types (Linear, Embedding, Conv) only say how their factors are shaped and applied; adapter bookkeeping,
initialisation, merging and trainability live here once. The delta math itself lives in ``lorakit.delta``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ..caches import state_without_caches
from ..delta import delta_matrix
from ..errors import PeftWarning
from ..init import InitRequest, frozen_factors, run_init
from ..routing import current_routing
from .record import AdapterRecord

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..routing import BatchRouting


def finite_as_stored(weight32: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if a float32 merged weight holds no NaN/inf once cast to the stored ``dtype`` (fp16 overflows to inf
    above 65504); integer (quantised) storage is checked in float32, where a cast would hide NaNs."""
    stored = weight32.to(dtype) if dtype.is_floating_point else weight32
    return bool(torch.isfinite(stored).all())


class _ScalingView(Mapping):
    """PEFT-style ``layer.scaling[name]`` view over the records; assignment rescales the record."""

    def __init__(self, layer: LoraLayer) -> None:
        self._layer = layer
        self._records = layer.adapters

    def __getitem__(self, key: str) -> float:
        return self._records[key].scaling

    def __setitem__(self, key: str, value: float) -> None:
        self._layer._rescale(key, value / self._records[key].base_scaling)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return repr(dict(self))


class LoraLayer(nn.Module):
    """Base of every LoRA layer type. Subclasses implement the five ``_factor*`` / ``_weight*`` / ``_lora_term``
    hooks; everything else (records, init, merge stack, enable/disable, trainability) is shared."""

    layer_kind: ClassVar[str] = "linear"
    adapter_layer_names: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave out the derived ``_lorakit_`` caches (weak references, device tensors)."""
        return state_without_caches(self)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.adapters: dict[str, AdapterRecord] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapters: list[str] = []

    # ------------------------------------------------------------------ hooks for layer types
    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        """Create the adapter's A and B (float32, CPU or meta) under PEFT's attribute names."""
        raise NotImplementedError

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factor parameters (A, B) as stored."""
        raise NotImplementedError

    def _factors_2d(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) as matrix views of the stored factors."""
        a, b = self._factors(name)
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def _weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """Base weight in its own layout -> (out, in)."""
        return weight

    def _weight_from_2d(self, matrix: torch.Tensor) -> torch.Tensor:
        """(out, in) -> the base weight's layout."""
        return matrix

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive output s * B(A(dropout(x))), shaped like the base output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ PEFT-compatible views
    @property
    def r(self) -> dict[str, int]:
        return {n: rec.r for n, rec in self.adapters.items()}

    @property
    def lora_alpha(self) -> dict[str, float]:
        return {n: rec.lora_alpha for n, rec in self.adapters.items()}

    @property
    def scaling(self) -> _ScalingView:
        return _ScalingView(self)

    @property
    def use_dora(self) -> dict[str, bool]:
        return {n: rec.variant is not None and rec.variant.name == "dora" for n, rec in self.adapters.items()}

    @property
    def lora_bias(self) -> dict[str, bool]:
        return {n: rec.lora_bias for n, rec in self.adapters.items()}

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, LoraLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        """The adapted parameter (merge, unmerge and init read and write it); the base layer's weight."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        config: LoraConfig,
        *,
        module_name: str = "",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` with rank ``r`` on this layer and initialise it."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r!r} for layer {module_name or self}.")
        record = AdapterRecord(
            r=r,
            lora_alpha=lora_alpha,
            use_rslora=config.use_rslora,
            lora_bias=config.lora_bias,
            dropout=float(config.lora_dropout),
        )
        record.frozen = frozen_factors(config.init_lora_weights)
        self._check_supported(adapter_name, record, config, module_name)
        if record.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(  # PEFT's warning; merging such an adapter raises
                f"`lora_bias=True` was passed but the targeted layer {module_name or ''!r} of type "
                f"{type(self.get_base_layer()).__name__} has no bias. This means that merging LoRA weights won't be "
                "possible.",
                PeftWarning,
                stacklevel=4,
            )
        if adapter_name in self.adapters:  # replacing: nothing of the old adapter (e.g. a DoRA magnitude) may remain
            if adapter_name in self.merged_adapters:
                raise ValueError(f"Adapter {adapter_name!r} is merged into this layer; unmerge it before replacing it.")
            self._drop_adapter_state(adapter_name)
        self.adapters[adapter_name] = record
        self.lora_dropout[adapter_name] = nn.Dropout(p=record.dropout) if record.dropout > 0 else nn.Identity()
        if low_cpu_mem_usage:
            with torch.device("meta"):
                self._create_factors(adapter_name, record)
        else:
            # on the base weight's device: an init computed there (PiSSA's SVD, ...) is written without a round trip
            weight_device = self.weight.device
            with torch.device("cpu" if weight_device.type == "meta" else weight_device):
                self._create_factors(adapter_name, record)
            self._initialise(adapter_name, config, module_name)
        self._move_adapter(adapter_name, autocast_adapter_dtype)
        record.variant = self._resolve_variant(config)
        if record.variant is not None:  # on meta factors (low_cpu_mem_usage) it creates meta placeholders
            record.variant.init(self, adapter_name)
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters)

    def _check_supported(self, adapter_name: str, record: AdapterRecord, config: LoraConfig, module_name: str) -> None:
        """Layer types reject settings they cannot honour (e.g. lora_bias on an Embedding)."""

    def _resolve_variant(self, config: LoraConfig):
        from ..variants import resolve_variant

        return resolve_variant(self, config)

    def _initialise(self, name: str, config: LoraConfig, module_name: str, generator=None) -> None:
        """Run the registered init method for ``config.init_lora_weights`` and write its results."""
        record = self.adapters[name]
        a2d, b2d = self._factors_2d(name)
        request = InitRequest(
            layer_kind=self.layer_kind,
            module_name=module_name,
            rank=record.r,
            scaling=record.scaling,
            a_shape=tuple(a2d.shape),
            b_shape=tuple(b2d.shape),
            config=config,
            adapter_name=name,
            base_weight=self.base_weight_2d,
            generator=generator,
            layer=self,
        )
        result = run_init(request)
        self.set_factors_2d(name, result.lora_a, result.lora_b)
        if result.base_weight is not None:
            self.write_base_weight_2d(result.base_weight)
        if result.scaling is not None:
            record.scale = result.scaling / record.base_scaling
        lora_b = getattr(self, "lora_B", None)
        if record.lora_bias and config.init_lora_weights is not False and lora_b is not None:
            with torch.no_grad():  # as PEFT: lora_B's bias starts at zero unless init is False, so init is a no-op
                lora_b[name].bias.zero_()

    def set_factors_2d(self, name: str, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Copy 2-D values into A (r, in) and B (out, r); None leaves a factor as it is."""
        a, b = self._factors(name)
        with torch.no_grad():
            if lora_a is not None:
                a.copy_(lora_a.reshape(a.shape).to(a.dtype))
            if lora_b is not None:
                b.copy_(lora_b.reshape(b.shape).to(b.dtype))

    def base_weight_2d(self) -> torch.Tensor:
        """A float32 (out, in) copy of the base weight (quantised layers override to dequantise)."""
        return self._weight_to_2d(self.weight.detach()).float().clone()

    def write_base_weight_2d(self, matrix: torch.Tensor) -> None:
        """Replace the base weight with a (out, in) matrix, cast to its dtype (quantised layers re-quantise)."""
        weight = self.weight
        with torch.no_grad():
            weight.data = self._weight_from_2d(matrix).to(device=weight.device, dtype=weight.dtype).contiguous()
        # the new storage may reuse the old one's address (caching allocator): drop what was derived from W
        self.__dict__.pop("_lorakit_dora_wsq", None)

    def _move_adapter(self, name: str, autocast_adapter_dtype: bool) -> None:
        """Put the adapter on the base weight's device; float32 on fp16/bf16 bases when autocasting."""
        weight = self.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is None or name not in container:
                continue
            item = container[name]
            if any(p.is_meta for p in item.parameters()) if isinstance(item, nn.Module) else item.is_meta:
                continue
            if isinstance(item, nn.Module):
                item.to(device=weight.device, dtype=dtype)
            else:
                item.data = item.data.to(device=weight.device, dtype=dtype)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is not None and name in container:
                item = container[name]
                yield from item.parameters() if isinstance(item, nn.Module) else [item]

    def trainable_adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """``adapter_parameters`` without the factors the init method keeps frozen (MiCA's B)."""
        frozen = self.adapters[name].frozen if name in self.adapters else frozenset()
        skip = {id(f) for f, label in zip(self._factors(name), ("A", "B")) if label in frozen} if frozen else set()
        for param in self.adapter_parameters(name):
            if id(param) not in skip:
                yield param

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Activate ``adapter_names`` (several add up); only active adapters require grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.merged and set(names) != set(self._active_adapters):
            warnings.warn("Adapters were merged; unmerging before switching the active adapter.", stacklevel=2)
            self.unmerge()
        for name in self.adapters:
            for param in self.adapter_parameters(name):
                param.requires_grad_(False)
            if name in names:
                for param in self.trainable_adapter_parameters(name):
                    param.requires_grad_(True)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Turn all adapters of this layer on or off (off: base output; merged adapters are unmerged on forward)."""
        self._disable_adapters = not enabled
        if not enabled:
            for name in self.adapters:
                for param in self.adapter_parameters(name):
                    param.requires_grad_(False)
        else:
            self.set_adapter(self._active_adapters)

    def _drop_adapter_state(self, adapter_name: str) -> None:
        """Remove the adapter's record and every per-adapter entry (factors, dropout, variant parameters)."""
        for attr in (*self.adapter_layer_names, "lora_dropout"):
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        del self.adapters[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every trace of ``adapter_name``; if it was active, fall back to another adapter."""
        if adapter_name not in self.adapters:
            return
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; unmerge it before deleting.")
        self._drop_adapter_state(adapter_name)
        remaining = [n for n in self._active_adapters if n != adapter_name]
        if not remaining and self.adapters:
            remaining = [next(iter(self.adapters))]
        self._active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    # runtime scaling, as PEFT's set_scale / scale_layer / unscale_layer
    def _rescale(self, adapter: str, scale: float) -> None:
        """Set the runtime scale of ``adapter``; refused while it is merged (unmerge must subtract the merged delta)."""
        if adapter in self.merged_adapters:
            raise ValueError(
                f"Adapter {adapter!r} is merged into this layer's weights; unmerge it before changing its scale."
            )
        self.adapters[adapter].scale = scale
        self.adapters[adapter].sync_scaling()

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.adapters:
            self._rescale(adapter, scale)

    def scale_layer(self, scale: float) -> None:
        for name in self._active_adapters:
            if name in self.adapters:
                self._rescale(name, self.adapters[name].scale * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        for name in self._active_adapters:
            if name in self.adapters:
                rec = self.adapters[name]
                self._rescale(name, 1.0 if scale is None else rec.scale / scale)

    # ------------------------------------------------------------------ delta, merge, unmerge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * B @ A in the base weight's layout, float32."""
        a2d, b2d = self._factors_2d(adapter_name)
        return self._weight_from_2d(delta_matrix(a2d, b2d, self.adapters[adapter_name].scaling))

    def _check_mergeable(self, adapter_name: str) -> None:
        """Layer types (and variants, with an optional ``check_mergeable``) raise here when the adapter cannot be
        folded into the base weight."""
        check = getattr(self.adapters[adapter_name].variant, "check_mergeable", None)
        if check is not None:
            check(self, adapter_name)

    def _merged_weight(self, name: str, weight32: torch.Tensor) -> torch.Tensor:
        variant = self.adapters[name].variant
        if variant is not None:
            return variant.merged_weight(self, name, weight32)
        return weight32 + self.get_delta_weight(name).to(weight32.device)

    def _unmerged_weight(self, name: str, weight32: torch.Tensor) -> torch.Tensor:
        variant = self.adapters[name].variant
        if variant is not None:
            return variant.unmerged_weight(self, name, weight32)
        return weight32 - self.get_delta_weight(name).to(weight32.device)

    def _bias_delta(self, name: str) -> torch.Tensor | None:
        """lora_B's bias times s when lora_bias is on (lora_B is a module with a bias), else None."""
        if not self.adapters[name].lora_bias:
            return None
        return self.lora_B[name].bias.detach().float() * self.adapters[name].scaling

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (float32 math, cast back); safe_merge checks finiteness first.

        The weight is read through ``base_weight_2d`` and written through ``write_base_weight_2d``, so quantised
        layers dequantise and re-quantise here exactly as for PiSSA/OLoRA."""
        names = self._adapters_to_merge(adapter_names)
        base = self.get_base_layer()
        for name in names:
            self._check_mergeable(name)
            new_weight = self._merged_weight(name, self._weight_from_2d(self.base_weight_2d()))
            bias_delta = self._bias_delta(name)
            if safe_merge and not finite_as_stored(new_weight, self.weight.dtype):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if bias_delta is not None and base.bias is None:
                raise ValueError(f"Adapter {name!r} has lora_bias but the base layer has no bias to merge it into.")
            self.write_base_weight_2d(self._weight_to_2d(new_weight))
            with torch.no_grad():
                if bias_delta is not None:
                    base.bias.data = (base.bias.float() + bias_delta).to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in LIFO order; restores the original weights up to rounding."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight32 = self._weight_from_2d(self.base_weight_2d())
            self.write_base_weight_2d(self._weight_to_2d(self._unmerged_weight(name, weight32)))
            with torch.no_grad():
                bias_delta = self._bias_delta(name)
                if bias_delta is not None:
                    base.bias.data = (base.bias.float() - bias_delta).to(base.bias.dtype)

    def _adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of strings, got {adapter_names!r}.")
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.adapters]
        pending = [n for n in names if n not in self.merged_adapters]
        if names and not pending:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        elif len(pending) < len(names):
            done = sorted(set(names) - set(pending))
            warnings.warn(f"Already merged: {done}; merging only {pending}.", stacklevel=3)
        return pending

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        routing = current_routing()
        if routing is not None:
            return self._forward_mixed(x, routing, *args, **kwargs)
        return self._forward_active(x, *args, **kwargs)

    def _forward_active(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The ordinary forward: base output plus each active, unmerged adapter's term (or its variant)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_adapters:
            record = self.adapters.get(name)
            if record is None or name in self.merged_adapters:
                continue  # merged adapters are already in the base weight
            if record.variant is not None:
                result = record.variant.forward(self, name, x, result)
            else:
                result = result + self._lora_term(name, x).to(result.dtype)
        return result

    def _forward_mixed(self, x: torch.Tensor, routing: BatchRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed-adapter batch: each row gets its own adapter (or none). Reference path: one pass per adapter
        over its rows; ``lorakit.kernels`` replaces this with gathered kernels where available."""
        from ..mixed import mixed_forward

        return mixed_forward(self, x, routing, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={rec.r}, alpha={rec.lora_alpha}" for n, rec in self.adapters.items())
