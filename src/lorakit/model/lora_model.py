"""LoraModel: the user's model (``.model``) with LoRA layers injected, and the adapter lifecycle on it.

``PeftModel.base_model`` is a LoraModel, which is why saved keys start with ``base_model.model.``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..caches import state_without_caches
from ..config import LoraConfig
from ..kernels.factor_casts import model_call
from ..layers import LoraLayer
from ..layers.base import finite_as_stored
from ..tokens import TrainableTokensWrapper
from . import peft_warnings
from .adapter_names import check_adapter_name
from .base_rewrite import check_base_rewrite_allowed
from .inject import inject_lora, split_parent, wrap_modules_to_save
from .modules_to_save import ModulesToSaveWrapper
from .trainable import mark_trainable
from .walk import adapter_modules
from .weight_tying import plan_weight_tying, tie_lora_factors, tie_saved_copies


@contextlib.contextmanager
def restore_on_error(model: nn.Module) -> Iterator[None]:
    """If the block raises, put back every submodule that was replaced (wrapped), the requires_grad flags and the
    train/eval modes of ``model`` as they were on entry. Tensor values are not copied: callers only add modules."""
    modules = dict(model.named_modules())
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in modules.values()]
    try:
        yield
    except BaseException:
        for name in sorted(modules, key=lambda n: n.count(".")):
            parent_name, _, child = name.rpartition(".")
            parent = modules.get(parent_name)
            if name and parent is not None and parent._modules.get(child) is not modules[name]:
                parent._modules[child] = modules[name]
        for param, flag in grads:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        raise


_ADAPTER_MODULES = (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)
"""Module types the lifecycle walks; their per-adapter internals are never visited."""


class LoraModel(nn.Module):
    prefix = "lora_"

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave out the derived ``_lorakit_`` caches (weak references, device tensors)."""
        return state_without_caches(self)

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        auto_modules_to_save: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        peft_warnings.warn_existing_peft_config(model)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = [adapter_name]
        configs = config if isinstance(config, dict) else {adapter_name: config}
        if adapter_name not in configs:  # it becomes the active adapter: never activate one that does not exist
            raise ValueError(f"adapter_name {adapter_name!r} is not among the given configs {sorted(configs)}.")
        for name, cfg in configs.items():
            self.inject_adapter(
                name,
                cfg,
                low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
                auto_modules_to_save=auto_modules_to_save,
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with model_call(self):  # fused layers cast their float32 factors for this call in one batch
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ iteration helpers
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in adapter_modules(self.model, _ADAPTER_MODULES):
            if isinstance(module, LoraLayer):
                yield name, module

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        for _, module in adapter_modules(self.model, _ADAPTER_MODULES):
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    def _token_wrappers(self) -> Iterator[tuple[str, TrainableTokensWrapper]]:
        for name, module in adapter_modules(self.model, _ADAPTER_MODULES):
            if isinstance(module, TrainableTokensWrapper):
                yield name, module

    def _mergeables(self) -> Iterator[tuple[str, LoraLayer | TrainableTokensWrapper]]:
        """Everything with a merge stack: LoRA layers and trainable-token wrappers."""
        for name, module in self.model.named_modules():
            if isinstance(module, (LoraLayer, TrainableTokensWrapper)):
                yield name, module

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths of the modules that carry LoRA layers (PEFT's attribute)."""
        from .targeted import targeted_module_names

        return targeted_module_names(self.lora_layers())

    @property
    def targeted_parameter_names(self) -> list[str]:
        """``module.parameter`` paths adapted through ``target_parameters`` (PEFT's attribute)."""
        from .targeted import targeted_parameter_names

        return targeted_parameter_names(self.lora_layers())

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def inject_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        *,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        auto_modules_to_save: tuple[str, ...] = (),
    ) -> None:
        """Add adapter ``adapter_name`` (not activated unless it is the first one)."""
        check_adapter_name(adapter_name, list(self.peft_config))
        peft_warnings.warn_adapter_name_in_prefix(adapter_name)
        check_base_rewrite_allowed(config, adapter_name, list(self.peft_config), runs_init=not low_cpu_mem_usage)
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("Only one adapter may set bias != 'none'; an existing adapter already trains biases.")
        with self.adding(adapter_name):
            self._prepare_model(config)
            self.peft_config[adapter_name] = config
            tying = plan_weight_tying(self.model, config)
            inject_lora(
                self.model,
                config,
                adapter_name,
                low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            wrap_modules_to_save(
                self.model, list(config.modules_to_save or []), adapter_name, auto_names=auto_modules_to_save
            )
            tie_saved_copies(self.model, tying, adapter_name)
            if tying.lora:
                tie_lora_factors(
                    self.model,
                    tying,
                    adapter_name,
                    config,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                )
            self._apply_trainability()

    @contextlib.contextmanager
    def adding(self, adapter_name: str) -> Iterator[None]:
        """Add ``adapter_name`` inside the block all or nothing: if the block raises, the adapter is removed from
        every layer and config, layers created for it are unwrapped again and grad flags and modes restored."""
        existed = adapter_name in self.peft_config
        with restore_on_error(self.model):
            try:
                yield
            except BaseException:
                if not existed:
                    self.peft_config.pop(adapter_name, None)
                    self._purge(adapter_name)
                raise

    def _prepare_model(self, config: LoraConfig) -> None:
        """Model surgery a config asks for before injection (layer replication)."""
        if config.layer_replication:
            from ..replication import replicate_layers

            replicate_layers(self.model, config.layer_replication)

    def _purge(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer (used to roll back a failed injection)."""
        for _, layer in list(self.lora_layers()):
            layer.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        for _, tokens in self._token_wrappers():
            tokens.delete_adapter(adapter_name)

    def _apply_trainability(self) -> None:
        mark_trainable(self.model, self.peft_config, self._active)
        inference = all(self.peft_config[n].inference_mode for n in self._active if n in self.peft_config)
        for _, tokens in self._token_wrappers():
            tokens.set_adapter(self._active, inference_mode=inference)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their outputs add up). As in PEFT, the activated adapters become
        trainable unless ``inference_mode`` (recorded in their configs); inactive adapters are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"Adapter(s) {unknown or names} not found; existing adapters: {sorted(self.peft_config)}.")
        if len(set(names)) != len(names):  # every layer would add the repeated adapter's output twice
            raise ValueError(f"Adapter names {names} name an adapter twice; give each active adapter once.")
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._active = names
        self._apply_trainability()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' LoRA weights and modules_to_save copies on or off, leaving which
        adapters are active as it is."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._validate_names(names)
        for _, layer in self.lora_layers():
            for name in names:
                if name not in layer.adapters:
                    continue
                params = layer.trainable_adapter_parameters(name) if requires_grad else layer.adapter_parameters(name)
                for param in params:
                    param.requires_grad_(requires_grad)
        for wrapper in self._wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)
        for _, tokens in self._token_wrappers():
            for name in names:
                for param in tokens.adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    def _set_layers_enabled(self, enabled: bool) -> None:
        for _, layer in self.lora_layers():
            layer.enable_adapters(enabled)
        for wrapper in self._wrappers():
            wrapper.enable_adapters(enabled)
        for _, tokens in self._token_wrappers():
            tokens.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_layers_enabled(True)
        self._apply_trainability()

    def disable_adapter_layers(self) -> None:
        for name in self._active:
            if self.peft_config[name].bias != "none":
                warnings.warn(
                    f"Adapter {name!r} trains biases (bias={self.peft_config[name].bias!r}); disabling the adapter "
                    "layers does not undo bias changes.",
                    stacklevel=2,
                )
        self._set_layers_enabled(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Base-model outputs inside the block; the previous state is restored even on exceptions."""
        states = [(m, m.disable_adapters) for _, m in self.lora_layers()] + [
            (w, w.disable_adapters) for w in self._wrappers()
        ]
        states += [(t, t.disable_adapters) for _, t in self._token_wrappers()]
        if len({was_disabled for _, was_disabled in states}) > 1:  # PEFT warns on the same condition
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, each layer is restored to its "
                "state (PEFT enables all of them).",
                stacklevel=3,
            )
        self._set_layers_enabled(False)
        try:
            yield
        finally:
            for module, was_disabled in states:
                module.enable_adapters(not was_disabled)
            self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every trace of an adapter; if it was active, another one becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; existing adapters: {sorted(self.peft_config)}.")
        merged_in = [n for n, layer in self._mergeables() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into {len(merged_in)} layers (e.g. {merged_in[0]}); "
                "call unmerge_adapter() before deleting it."
            )
        del self.peft_config[adapter_name]
        self._purge(adapter_name)
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        peft_warnings.warn_active_adapter_deleted(adapter_name, adapter_name in self._active, remaining)
        self._active = remaining
        self._apply_trainability()

    # ------------------------------------------------------------------ combining adapters
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """New adapter ``adapter_name`` from a weighted combination of ``adapters`` (see lorakit.merging); keyword
        arguments as PEFT's: combination_type="svd", svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
        majority_sign_method."""
        from ..merging import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    # ------------------------------------------------------------------ runtime scaling
    def set_adapter_scale(self, adapter_name: str, scale: float) -> None:
        """Scaling of ``adapter_name`` becomes ``scale`` times alpha / r on every layer (refused while merged)."""
        from ..helpers import set_adapter_scale

        set_adapter_scale(self.model, adapter_name, scale)

    def rescale_adapter_scale(self, multiplier: float) -> contextlib.AbstractContextManager[None]:
        """Context manager: every adapter's scaling times ``multiplier`` inside the block (see lorakit.helpers)."""
        from ..helpers import rescale_adapter_scale

        return rescale_adapter_scale(self.model, multiplier)

    # ------------------------------------------------------------------ merging
    def _check_merge_allowed(self) -> None:
        replicated = [n for n, c in self.peft_config.items() if c.layer_replication]
        if replicated:
            raise ValueError(
                f"Adapter {replicated[0]!r} uses layer_replication: replicated layers share base weights, so merging "
                "would apply every copy's delta to all of them. Merging is refused."
            )

    def _validate_names(self, adapter_names: list[str] | None) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of strings, got {adapter_names!r}; use [{adapter_names!r}].")
        names = self._active if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; existing adapters: {sorted(self.peft_config)}.")
        return names

    def _plan_merge(self, names: list[str], safe_merge: bool) -> list[tuple[str, LoraLayer, list[str]]]:
        """(layer path, layer, adapters still to merge there) for every layer (and trainable-token wrapper), checked
        before any weight changes: a refused or broken merge raises here and leaves the model as it was."""
        self._check_merge_allowed()
        plan = []
        for path, layer in self._mergeables():
            pending = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
            if isinstance(layer, TrainableTokensWrapper):
                layer.check_merge(pending, safe_merge)
                plan.append((path, layer, pending))
                continue
            tied = sorted(set(getattr(layer, "tied_lora_adapters", ())) & set(pending))
            if tied:
                raise ValueError(
                    f"Adapter(s) {tied} on {path!r} share their LoRA factors and base weight with the input embedding "
                    "(ensure_weight_tying): merging would add the same delta to the shared weight twice (PEFT does). "
                    "Merging is refused; keep the adapter unmerged or train it with ensure_weight_tying=False."
                )
            for name in pending:
                layer._check_mergeable(name)
            if pending and safe_merge:
                _check_finite_merge(path, layer, pending)
            plan.append((path, layer, pending))
        return plan

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the given (default: active) adapters into the base weights, in float32 and cast back.

        Idempotent: adapters already merged are skipped with a warning. With ``safe_merge`` every merged weight is
        computed on a copy and checked for NaN/inf first; nothing is merged if any adapter is broken."""
        plan = self._plan_merge(self._validate_names(adapter_names), safe_merge)
        if not any(pending for _, _, pending in plan):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        peft_warnings.warn_tied_targets_on_merge(self.model, self.targeted_module_names)
        peft_warnings.warn_merging_more(
            (n for _, layer, pending in plan if pending for n in layer.merged_adapters),
            (n for _, layer, pending in plan if layer.merged for n in pending),
        )
        for _, layer, pending in plan:
            if pending:
                layer.merge(adapter_names=pending)

    def unmerge_adapter(self) -> None:
        """Undo every merge (last merged first); the base weights come back up to float rounding."""
        merged = [layer for _, layer in self._mergeables() if layer.merged]
        if not merged:
            peft_warnings.warn_nothing_merged()
        for layer in merged:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the given (default: active) adapters and return the plain base model: no LoRA module is left, and
        modules_to_save are replaced by the first merged adapter's copy."""
        names = self._validate_names(adapter_names)
        plan = self._plan_merge(names, safe_merge)
        peft_warnings.warn_tied_targets_on_merge(self.model, self.targeted_module_names)
        return self._unload(plan, names, progressbar, "Unloading and merging model")

    def unload(self) -> nn.Module:
        """Remove all LoRA modules without merging; returns the original base model (original modules_to_save)."""
        plan = [(path, layer, []) for path, layer in self._mergeables()]
        return self._unload(plan, [], False, "Unloading model")

    def _unload(
        self, plan: list[tuple[str, LoraLayer, list[str]]], names: list[str], progressbar: bool, desc: str
    ) -> nn.Module:
        iterator = plan
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(plan, desc=desc)
        unwrapped: list[str] = []
        for path, layer, pending in iterator:
            if pending:
                layer.merge(adapter_names=pending)
            path = _path_after_unwrap(path, unwrapped)
            if path is None:
                continue  # in the base_layer chain of a wrapper already replaced by its base (target_parameters)
            parent, child = split_parent(self.model, path)
            setattr(parent, child, layer.get_base_layer())
            unwrapped.append(path)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, child = split_parent(self.model, path)
                keep = next((n for n in names if n in module.modules_to_save), None)
                setattr(parent, child, module.unwrapped(keep))
        _note_untied_embeddings(self.model)
        return self.model


def _path_after_unwrap(path: str, unwrapped: list[str]) -> str | None:
    """Where the layer at ``path`` sits once the wrappers at ``unwrapped`` were replaced by their bases: None if it
    was in a wrapper's ``base_layer`` chain (gone with it), else the path without that wrapper's ``base_layer``
    (a LoRA layer nested deeper in the base, as MultiheadAttention's out_proj)."""
    for done in unwrapped:
        if path.startswith(done + "."):
            rest = path[len(done) + 1 :].split(".")
            while rest and rest[0] == "base_layer":
                rest.pop(0)
            return ".".join([done, *rest]) if rest else None
    return path


def _check_finite_merge(path: str, layer: LoraLayer, pending: list[str]) -> None:
    """Compute the merged weight of ``layer`` on a copy (float32, cast to the base dtype) and raise, naming the
    adapter, if it holds NaN or inf."""
    dtype = layer.weight.dtype
    weight = layer._weight_from_2d(layer.base_weight_2d())  # float32 copy in the weight's layout
    for name in pending:
        weight = layer._merged_weight(name, weight)
        bias = layer._bias_delta(name)
        finite = finite_as_stored(weight, dtype) and (bias is None or torch.isfinite(bias).all())
        if not finite:
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken (layer {path}); "
                "nothing was merged."
            )


def _note_untied_embeddings(model: nn.Module) -> None:
    """After unloading, a model configured with tied embeddings whose input and output embeddings no longer share a
    weight (a merged adapter changed one of them) gets ``tie_word_embeddings=False``, with PEFT's warning."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False
        warnings.warn(
            "Input and output embeddings are no longer tied after merging. Setting `tie_word_embeddings=False` in "
            "the model config.",
            stacklevel=4,
        )
