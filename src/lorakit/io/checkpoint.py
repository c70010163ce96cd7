"""Saving and loading adapters in PEFT's format: adapter_config.json + adapter_model.safetensors (or .bin).

The ``default`` adapter lives at the root of the folder, every other adapter in a subfolder named after it.
Each adapter's save is one transaction (``io.transaction``), and its weights name the config they were saved with
(``io.binding``), which loading checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn

from ..config import CONFIG_NAME, LoraConfig
from ..config.lora_config import PEFT_COMPAT_VERSION
from .binding import check_belongs, saved_config
from .hub import resolve_file
from .model_card import model_card_text
from .ownership import check_ownership
from .shape_check import warn_malformed_lora
from .state_dict import AdapterKeys, adapter_state_dict, to_memory_keys
from .transaction import reading, write_transaction
from .weights_file import BIN_NAME, SAFETENSORS_NAME, WEIGHTS_NAMES, check_values, read_weights, write_weights

if TYPE_CHECKING:
    from ..peft_model import PeftModel

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "subfolder")


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies with no shared storage (safetensors refuses tied tensors)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def save_adapters(
    model: PeftModel,
    save_directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **ignored: Any,
) -> None:
    """Write each selected adapter (default: all) in PEFT's layout under ``save_directory``.

    ``state_dicts`` gives ready disk-format tensors per adapter; ``state_dict`` a full model state dict to take the
    values from (as PEFT's ``save_pretrained(state_dict=...)``, e.g. gathered from sharded training)."""
    if ignored:
        warnings.warn(f"save_pretrained ignores the keyword arguments {sorted(ignored)}.", stacklevel=3)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {str(save_directory)!r} is a file; give a folder.")
    if isinstance(selected_adapters, str):  # list("default") would be seven one-letter names
        raise TypeError(f"selected_adapters must be a list of adapter names; use [{selected_adapters!r}].")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; existing adapters: {sorted(model.peft_config)}.")
    if state_dicts is None and state_dict is None and any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise ValueError(
            "The model's parameters are sharded (DTensors, e.g. from FSDP2's fully_shard); gather the adapter on every "
            "rank with lorakit.integrations.distributed.gather_adapter_state_dict(model) and pass it as "
            "save_pretrained(..., state_dict=...)."
        )
    if not names:
        raise ValueError(
            f"There is no adapter to save to {str(save_directory)!r}: the model has none (all were deleted, or "
            "merge_and_unload()/unload() removed them). Nothing was written."
        )
    if not is_main_process:
        return
    contents = {}
    for name in names:  # every adapter's tensors first: an empty one stops the save before any file is replaced
        tensors = (state_dicts or {}).get(name)
        if tensors is None:
            tensors = adapter_state_dict(model, name, model.peft_config[name], save_embedding_layers, state_dict)
        warn_malformed_lora(tensors, name)
        if not tensors:
            raise ValueError(
                f"Adapter {name!r} has no tensors in the model: its layers were merged and unloaded "
                "(merge_and_unload()/unload()) or removed. Saving it would replace the adapter in "
                f"{str(save_directory)!r} by an empty one; nothing was written."
            )
        contents[name] = _untie(tensors)
    for name, tensors in contents.items():
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        config = model.peft_config[name]
        _write_adapter(model, folder, config, tensors, safe_serialization, (config_overrides or {}).get(name))


def _config_extras(model: PeftModel, config: LoraConfig) -> dict[str, Any]:
    base = model.get_base_model()
    extras: dict[str, Any] = {}
    if config.base_model_name_or_path is None:
        # models built from a config have name_or_path "", which is no model id: PEFT writes null then
        extras["base_model_name_or_path"] = getattr(base, "name_or_path", None) or None
    if config.task_type is None:
        extras["auto_mapping"] = {
            "base_model_class": type(base).__name__,
            "parent_library": type(base).__module__,
        }
    return extras


def _write_adapter(
    model: PeftModel,
    folder: Path,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    safe_serialization: bool,
    overrides: dict[str, Any] | None,
) -> None:
    """Replace the adapter in ``folder`` by this one in one transaction: config, weights (naming the config) and,
    when the folder has none, a model card; the other format's weights file goes in the same transaction."""
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    extras = _config_extras(model, config) | (overrides or {})
    config_data = config.to_dict() | {"inference_mode": True, "peft_version": PEFT_COMPAT_VERSION} | extras
    config_text = json.dumps(config_data, indent=2, sort_keys=True)
    writers = {
        CONFIG_NAME: lambda path: path.write_text(config_text, encoding="utf-8"),
        weights_name: lambda path: write_weights(path, tensors, safe_serialization, config_text),
    }
    card = model_card_text(model, _read_card(folder / "README.md"))  # a card already there is updated, as in PEFT
    writers["README.md"] = lambda path: path.write_text(card, encoding="utf-8")
    write_transaction(folder, writers, WEIGHTS_NAMES)


def _read_card(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def local_folder(path_or_id: str | os.PathLike, subfolder: str | None = None) -> Path | None:
    """The adapter folder when ``path_or_id`` is a local one, else None (a Hub id)."""
    folder = Path(path_or_id) / subfolder if subfolder else Path(path_or_id)
    return folder if folder.is_dir() else None


def reading_adapter(path_or_id: str | os.PathLike, subfolder: str | None = None) -> contextlib.AbstractContextManager:
    """Context in which a local adapter folder's files are read together: a save to it waits (``io.transaction``)."""
    return reading(local_folder(path_or_id, subfolder), WEIGHTS_NAMES)


def read_adapter_weights(
    path_or_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    check_config: LoraConfig | bool = True,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Tensors of a saved adapter (safetensors preferred, then .bin); clear errors for missing or corrupt files.

    ``check_config``: the config the caller applies with these weights, checked against the one the weights were
    saved with (``io.binding``); True checks the ``adapter_config.json`` beside the weights file when there is one,
    False checks nothing (a config the user gave on purpose)."""
    subfolder = hub_kwargs.pop("subfolder", None)
    with reading_adapter(path_or_id, subfolder):
        path = resolve_file(path_or_id, SAFETENSORS_NAME, subfolder=subfolder, required=False, **hub_kwargs)
        if path is None:
            path = resolve_file(path_or_id, BIN_NAME, subfolder=subfolder, required=False, **hub_kwargs)
        if path is None:
            raise FileNotFoundError(
                f"No {SAFETENSORS_NAME} or {BIN_NAME} in {str(path_or_id)!r}"
                + (f" (subfolder {subfolder!r})" if subfolder else "")
                + "."
            )
        tensors, metadata = read_weights(path)
        used = _used_config(check_config, path)
    if used is not None:
        try:
            saved = saved_config(metadata)
        except ValueError as err:
            raise ValueError(f"{path}: {err}.") from None
        check_belongs(saved, used, str(path), str(path.with_name(CONFIG_NAME)))
    # moved outside the parse, so a device that is unknown or unavailable is reported as such, not as a bad file
    target = torch.device(device)
    return tensors if target.type == "cpu" else {k: v.to(target) for k, v in tensors.items()}


def read_adapter(
    path_or_id: str | os.PathLike,
    read_config: Callable[[], LoraConfig],
    config_given: bool,
    device: str | torch.device,
    hub_kwargs: dict[str, Any],
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved adapter, read together (a save to a local folder waits until both are read).

    ``read_config()`` gives the config; unless the user gave it (``config_given``), the weights must have been saved
    with it (``io.binding``)."""
    with reading_adapter(path_or_id, hub_kwargs.get("subfolder")):
        config = read_config()
        check: LoraConfig | bool = False if config_given else config
        tensors = read_adapter_weights(path_or_id, device=device, check_config=check, **hub_kwargs)
    return config, tensors


def _used_config(check_config: LoraConfig | bool, weights: Path) -> dict[str, Any] | None:
    """The config dict to check the weights against (see read_adapter_weights), or None for no check."""
    if isinstance(check_config, LoraConfig):
        return check_config.to_dict()
    beside = weights.with_name(CONFIG_NAME)
    if not check_config or not beside.is_file():
        return None
    try:
        data = json.loads(beside.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{beside} is not valid UTF-8 JSON: {err}.") from None
    return data if isinstance(data, dict) else None


def check_shapes(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise on the first tensor whose shape differs from the model's, naming the key and both shapes."""
    own = model.state_dict()
    for key, tensor in tensors.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(
                f"Adapter {source} does not fit this model: {key} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(own[key].shape)} in the model. Was it trained on another base model or with another "
                "rank pattern?"
            )


class LoadResult(NamedTuple):
    """Adapter keys the checkpoint lacked and checkpoint keys the model has no place for (in-memory names)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _drop_mismatched(own: dict[str, torch.Tensor], memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mismatched = [k for k, v in memory.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        shapes = ", ".join(f"{k}: {tuple(memory[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3])
        warnings.warn(
            f"ignore_mismatched_sizes: skipped {len(mismatched)} tensors whose shapes differ ({shapes}).", stacklevel=4
        )
    return {k: v for k, v in memory.items() if k not in mismatched}


def load_adapter_weights(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    source: str,
    ignore_mismatched_sizes: bool = False,
) -> LoadResult:
    """Copy disk-format ``tensors`` into adapter ``adapter_name``; returns the missing and unexpected in-memory
    keys. Shapes are all checked before anything is written."""
    check_values(tensors, source)  # named by the file's own keys
    memory = to_memory_keys(model, tensors, adapter_name)
    own = model.state_dict()
    if ignore_mismatched_sizes:
        memory = _drop_mismatched(own, memory)
    check_shapes(model, memory, source)
    unexpected = sorted(k for k in memory if k not in own)
    if unexpected:
        raise ValueError(
            f"Adapter {source} has {len(unexpected)} tensors this model has no place for, e.g. {unexpected[0]!r}. "
            "Was it trained on another base model or with other target modules?"
        )
    check_ownership(model, memory, adapter_name, source)
    keys = AdapterKeys(model)
    expected = [k for k in own if keys.adapter_of(k) == adapter_name]
    missing = sorted(k for k in expected if k not in memory)
    if missing:
        warnings.warn(
            f"Found missing adapter keys while loading the checkpoint: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
            stacklevel=3,
        )
    _load_tensors(model, own, memory)
    return LoadResult(missing, unexpected)


def _load_tensors(model: nn.Module, own: dict[str, torch.Tensor], memory: dict[str, torch.Tensor]) -> None:
    """Copy into existing tensors (keeping the model's dtype and device); assign only where the model holds meta
    placeholders (low_cpu_mem_usage factors), whose dtype and device the caller sets afterwards."""
    meta = {k: v for k, v in memory.items() if own[k].is_meta}
    model.load_state_dict({k: v for k, v in memory.items() if k not in meta}, strict=False)
    if meta:
        model.load_state_dict(meta, strict=False, assign=True)
