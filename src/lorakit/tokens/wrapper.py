"""TrainableTokensWrapper: stands where the embedding (or a head tied to it) was, with PEFT's layout.

``<path>.token_adapter.base_layer`` is the original module and ``<path>.token_adapter.trainable_tokens_delta.<name>``
the rows of adapter ``<name>`` (saved as ``<path>.token_adapter.trainable_tokens_delta``). The wrapper keeps the
adapter lifecycle: active adapters, enable/disable, merge stack, delete, mixed-adapter batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from ..routing import BASE_ADAPTER, BatchRouting, current_routing
from .adapter import TokenAdapter


class TrainableTokensWrapper(nn.Module):
    """Routes the wrapped module's output through the active adapters' token rows."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(module)
        self.merged_adapters: list[str] = []
        self._active_adapters: list[str] = []
        self._disable_adapters = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.token_adapter.base_layer, name)

    # ------------------------------------------------------------------ views
    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight the module effectively uses: a (V, dim) copy with the active rows written in, or the base
        Parameter when no rows apply (as PEFT; forward itself never builds this copy)."""
        names = self._names_in_use()
        if not names or self.merged:
            return self.original_module.weight
        return self.token_adapter.effective_weight(names)

    @property
    def adapters(self) -> list[str]:
        """Adapters with rows here: their own, or (a tied head) the embedding's."""
        return [*self.token_adapter.token_indices, *self.token_adapter._followed]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _names_in_use(self) -> list[str]:
        return [] if self._disable_adapters else list(self._active_adapters)

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, indices: list[int], autocast_adapter_dtype: bool = True) -> None:
        self.token_adapter.add(name, indices, autocast_adapter_dtype)

    def follow(self, name: str, source: TokenAdapter) -> None:
        self.token_adapter.follow(name, source)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The rows this wrapper owns for ``name`` (a tied head owns none: the embedding's wrapper trains them)."""
        if self.token_adapter.owns(name):
            yield self.token_adapter.trainable_tokens_delta[name]

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Activate the named adapters that have rows here; only their own rows train (unless inference_mode)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = [n for n in names if self.token_adapter.has(n)]
        for name in self.adapters:
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in self._active_adapters and not inference_mode and not self.disable_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if not enabled:
            for name in self.adapters:
                for param in self.adapter_parameters(name):
                    param.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into the token rows; unmerge it before deleting.")
        self.token_adapter.remove(adapter_name)
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]

    # ------------------------------------------------------------------ merge
    def check_merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Raise if ``names`` cannot be merged: rows overlapping a merged adapter's, or (safe_merge) not finite."""
        self.token_adapter.check_disjoint([*self.merged_adapters, *names])
        for name in names:
            if safe_merge and not torch.isfinite(self.token_adapter.rows(name)[1]).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the rows of the given (default: active) adapters into the base weight; idempotent."""
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        pending = [n for n in names if self.token_adapter.has(n) and n not in self.merged_adapters]
        if not pending:
            return
        self.check_merge(pending, safe_merge)
        for name in pending:
            self.token_adapter.write_rows(name, merged=True)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the original rows back, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self.token_adapter.write_rows(self.merged_adapters.pop(), merged=False)

    def get_base_layer(self) -> nn.Module:
        """The original module (with merged rows, if merged), for unload / merge_and_unload."""
        return self.original_module

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.original_module
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        routing = current_routing()
        if routing is not None:
            return self._forward_mixed(x, routing, *args, **kwargs)
        out = base(x, *args, **kwargs)
        names = self._active_adapters
        if self.merged or not names:
            return out
        if len(names) > 1:
            self.token_adapter.check_disjoint(names)
        return self.token_adapter.apply(x, out, names)

    def _forward_mixed(self, x: torch.Tensor, routing: BatchRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row with its own adapter's tokens; ``__base__`` rows and adapters without rows here: base output.

        Args:
            x: (B, ...) token ids (or hidden states for a tied head)
        Returns:
            (B, ...) the module's output
        """
        if self.merged:
            raise ValueError(
                f"Cannot run a mixed-adapter batch while token adapters {self.merged_adapters} are merged; call "
                "unmerge_adapter() first."
            )
        routing = routing.for_batch(x.shape[0])
        out = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups_on(x.device).items():
            if name == BASE_ADAPTER or not self.token_adapter.has(name):
                continue
            part = self.token_adapter.apply(x.index_select(0, rows), out.index_select(0, rows), [name])
            out = out.index_copy(0, rows, part)
        return out

    def extra_repr(self) -> str:
        own = {n: len(i) for n, i in self.token_adapter.token_indices.items()}
        followed = sorted(self.token_adapter._followed)
        return f"tokens={own}" + (f", tied to the embedding for {followed}" if followed else "")
