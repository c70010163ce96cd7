"""Multi-process training of a lorakit model: FSDP2 sharding per decoder layer, and gathering the adapter to save.

DDP needs nothing from lorakit: wrap the PeftModel in ``torch.nn.parallel.DistributedDataParallel`` (only the
trainable adapter parameters go into its buckets; the frozen base and inactive adapters have ``requires_grad=False``,
so ``find_unused_parameters`` is not needed) and save from the wrapped module on rank 0 with
``save_pretrained(..., is_main_process=rank == 0)``.

FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6) turns every parameter into a ``DTensor`` shard, so a
checkpoint must be gathered first. ``gather_adapter_state_dict`` gathers only the tensors the adapter files need
(a few MB), where ``get_model_state_dict(..., full_state_dict=True)`` would gather the whole base model as well.
torch is imported lazily: ``import lorakit`` stays free of ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..io.state_dict import adapter_state_dict


def decoder_layers(model: nn.Module, layer_cls: type | Iterable[type] | None = None) -> list[nn.Module]:
    """The modules to shard one by one: instances of ``layer_cls``, or by default of the classes a transformers model
    names in ``_no_split_modules`` (its decoder/encoder blocks, as accelerate's FSDP auto-wrap uses them).

    Raises ValueError naming the classes looked for when no module matches."""
    if layer_cls is None:
        names = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
        if not names:
            raise ValueError("The model names no _no_split_modules (no transformers model inside); pass layer_cls.")
        layers = [m for m in model.modules() if type(m).__name__ in names]
        wanted = sorted(names)
    else:
        classes = (layer_cls,) if isinstance(layer_cls, type) else tuple(layer_cls)
        layers = [m for m in model.modules() if isinstance(m, classes)]
        wanted = sorted(c.__name__ for c in classes)
    if not layers:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"No module of class {wanted} to shard; the model has: {', '.join(present)}.")
    return layers


def shard_lora_model(
    model: nn.Module, layer_cls: type | Iterable[type] | None = None, mesh: Any = None, **fully_shard_kwargs: Any
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every decoder layer (see ``decoder_layers``), then to ``model`` itself.

    ``mesh`` and ``fully_shard_kwargs`` (``mp_policy``, ``reshard_after_forward``, ...) go to every call; call it after
    ``get_peft_model`` / ``from_pretrained`` (the LoRA weights must exist before sharding) and before building the
    optimizer. Returns ``model`` (sharded in place, as ``fully_shard`` does)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model, layer_cls):
        fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor shard -> the whole tensor on CPU (a collective: every rank must call it); plain tensors as they are."""
    if hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def gather_adapter_state_dict(
    model: nn.Module, selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto"
) -> dict[str, torch.Tensor]:
    """The model's own state-dict entries that ``save_pretrained`` writes for ``selected_adapters`` (default: all),
    gathered whole onto CPU from FSDP2 shards; pass it as ``save_pretrained(..., state_dict=...)``.

    A collective: call it on every rank (then save with ``is_main_process=rank == 0``). Selection is the one
    ``save_pretrained`` uses (LoRA factors, DoRA magnitudes, modules_to_save, trainable tokens, biases, embeddings),
    so the result has exactly the keys the adapter files need, keyed as in ``model.state_dict()``."""
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; existing adapters: {sorted(model.peft_config)}.")
    own = model.state_dict()  # under FSDP2: local DTensor shards, cheap
    keys_of: dict[int, list[str]] = {}
    for key, tensor in own.items():
        keys_of.setdefault(id(tensor), []).append(key)  # tied weights share one tensor object
    wanted: set[str] = set()
    for name in names:
        chosen = adapter_state_dict(model, name, model.peft_config[name], save_embedding_layers, state_dict=own)
        for tensor in chosen.values():
            wanted.update(keys_of.get(id(tensor), ()))
    # state_dict order is the same on every rank, so the collectives line up
    return {key: _full(tensor) for key, tensor in own.items() if key in wanted}
