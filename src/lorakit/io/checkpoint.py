"""Saving and loading adapters in PEFT's format: adapter_config.json + adapter_model.safetensors (or .bin).

The ``default`` adapter lives at the root of the folder, every other adapter in a subfolder named after it.
Every file is written to a temporary name first and renamed only when all of the adapter's files are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn

from ..config import CONFIG_NAME, LoraConfig
from ..config.lora_config import PEFT_COMPAT_VERSION
from .atomic import atomic_path
from .hub import resolve_file
from .state_dict import AdapterKeys, adapter_state_dict, to_memory_keys

if TYPE_CHECKING:
    from ..peft_model import PeftModel

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
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


def _model_card(config: LoraConfig) -> str:
    base = config.base_model_name_or_path or "unknown"
    return (
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- lorakit\n---\n\n"
        f"# LoRA adapter\n\nRank {config.r}, alpha {config.lora_alpha}, targets {config.target_modules}.\n"
        "Saved by lorakit in PEFT's format; loads with `peft.PeftModel.from_pretrained` or "
        "`lorakit.PeftModel.from_pretrained`.\n"
    )


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
    if not is_main_process:
        return
    for name in names:
        config = model.peft_config[name]
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        tensors = (state_dicts or {}).get(name)
        if tensors is None:
            tensors = adapter_state_dict(model, name, config, save_embedding_layers, state_dict=state_dict)
        _write_adapter(model, folder, config, _untie(tensors), safe_serialization, (config_overrides or {}).get(name))


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
    folder.mkdir(parents=True, exist_ok=True)
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    extras = _config_extras(model, config) | (overrides or {})
    config_data = config.to_dict() | {"inference_mode": True, "peft_version": PEFT_COMPAT_VERSION} | extras
    with contextlib.ExitStack() as stack:
        tmp_weights = stack.enter_context(atomic_path(folder / weights_name))
        tmp_config = stack.enter_context(atomic_path(folder / CONFIG_NAME))
        tmp_card = stack.enter_context(atomic_path(folder / "README.md"))
        if safe_serialization:
            from safetensors.torch import save_file

            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp_weights), metadata={"format": "pt"})
        else:
            torch.save({k: v.cpu() for k, v in tensors.items()}, tmp_weights)
        tmp_config.write_text(json.dumps(config_data, indent=2, sort_keys=True), encoding="utf-8")
        if not (folder / "README.md").exists():
            tmp_card.write_text(_model_card(config), encoding="utf-8")
        else:
            tmp_card.write_bytes((folder / "README.md").read_bytes())
    stale = folder / (BIN_NAME if safe_serialization else SAFETENSORS_NAME)
    if stale.exists():
        stale.unlink()  # loading prefers safetensors; never leave an older adapter beside the new one


def read_adapter_weights(
    path_or_id: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Tensors of a saved adapter (safetensors preferred, then .bin); clear errors for missing or corrupt files."""
    subfolder = hub_kwargs.pop("subfolder", None)
    path = resolve_file(path_or_id, SAFETENSORS_NAME, subfolder=subfolder, required=False, **hub_kwargs)
    if path is None:
        path = resolve_file(path_or_id, BIN_NAME, subfolder=subfolder, required=False, **hub_kwargs)
    if path is None:
        raise FileNotFoundError(
            f"No {SAFETENSORS_NAME} or {BIN_NAME} in {str(path_or_id)!r}"
            + (f" (subfolder {subfolder!r})" if subfolder else "")
            + "."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Could not read adapter weights from {path}: the file is corrupt or truncated ({type(err).__name__}: "
            f"{err})."
        ) from None
    # moved outside the parse, so a device that is unknown or unavailable is reported as such, not as a bad file
    target = torch.device(device)
    return tensors if target.type == "cpu" else {k: v.to(target) for k, v in tensors.items()}


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
