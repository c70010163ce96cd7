"""modules_to_save: whole modules (e.g. a classifier head) trained in full, one copy per adapter.

The original module stays frozen as ``original_module``; each adapter owns a trainable copy in
``modules_to_save[adapter_name]`` (PEFT's attribute names, so checkpoints match).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..routing import BASE_ADAPTER, BatchRouting, current_routing

_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


class ModulesToSaveWrapper(nn.Module):
    """Routes calls to the active adapter's copy of a module, or to the frozen original."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if isinstance(module_to_save, _CONTAINERS):  # their forward cannot be called (PEFT raises the same TypeError)
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(module_to_save)}: a container has no "
                "forward; name the modules inside it (e.g. 'blocks.0') instead."
            )
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current_module(), name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapters[0] if self._active_adapters else None

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def weight(self) -> torch.Tensor:
        return self._current_module().weight

    def _current_module(self) -> nn.Module:
        if self._disable_adapters or not self._active_adapters:
            return self.original_module
        return self.modules_to_save[self._active_adapters[0]]

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        new = copy.deepcopy(self.original_module)
        for param in new.parameters():
            param.requires_grad_(False)
        self.modules_to_save[adapter_name] = new
        for param in self.original_module.parameters():
            param.requires_grad_(False)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(
                f"modules_to_save of {type(self.original_module).__name__} can only use one adapter at a time, got "
                f"{names}."
            )
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in names and not inference_mode)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Off: the frozen original answers and no copy trains; on: the active copy trains again."""
        self._disable_adapters = not enabled
        for name, module in self.modules_to_save.items():
            module.requires_grad_(enabled and name in self._active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Called exactly as the wrapped module would be: positional or keyword-only arguments."""
        routing = current_routing()
        if routing is None or self._disable_adapters:
            return self._current_module()(*args, **kwargs)
        return self._forward_mixed(routing, args, kwargs)

    def _forward_mixed(self, routing: BatchRouting, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Each row through its adapter's copy; rows of ``__base__`` or of adapters without a copy here go through
        the original module. The rows are split along the first tensor argument (positional, else keyword), which
        must be the batch input ``x``; the other arguments are passed unchanged.

        Args:
            x: (B, ...) input; B == len(routing), or a multiple of it for a generation routing
        Returns:
            (B, ...) the rows' outputs, in row order
        """
        key = _batch_argument(args, kwargs)
        x = args[key] if isinstance(key, int) else kwargs[key]
        routing = routing.for_batch(x.shape[0])
        result = None
        for name, rows in routing.groups_on(x.device).items():
            copy_ = self.modules_to_save[name] if name != BASE_ADAPTER and name in self.modules_to_save else None
            sub_args, sub_kwargs = _with_rows(args, kwargs, key, rows)
            out = (copy_ if copy_ is not None else self.original_module)(*sub_args, **sub_kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"Mixed-adapter batches need modules_to_save modules that return a tensor; "
                    f"{type(self.original_module).__name__} returned {type(out).__name__}."
                )
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result = result.index_copy(0, rows, out)  # every row is written exactly once
        return result if result is not None else self.original_module(*args, **kwargs)

    def unwrapped(self, adapter_name: str | None = None) -> nn.Module:
        """The module to keep on unload: the adapter's copy (merge) or the original."""
        if adapter_name is not None and adapter_name in self.modules_to_save:
            return self.modules_to_save[adapter_name]
        return self.original_module


def _batch_argument(args: tuple, kwargs: dict[str, Any]) -> int | str:
    """Position or name of the first tensor argument: the batch a mixed-adapter call splits by row."""
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return i
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return name
    raise TypeError(
        "A modules_to_save module in a mixed-adapter batch was called with no tensor argument to split by row "
        f"(positional: {len(args)}, keywords: {sorted(kwargs)})."
    )


def _with_rows(args: tuple, kwargs: dict[str, Any], key: int | str, rows: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the batch argument ``key`` replaced by its ``rows``."""
    if isinstance(key, int):
        return (*args[:key], args[key].index_select(0, rows), *args[key + 1 :]), kwargs
    return args, {**kwargs, key: kwargs[key].index_select(0, rows)}
