"""Targets taken from a state dict's keys (``inject_adapter_in_model(..., state_dict=...)``), as PEFT does.

A checkpoint made without adapter metadata still tells which modules carry LoRA: a key ``<module>.lora_A.weight``
(or ``.lora_embedding_A``, ``.lora_B``, ...) names ``<module>``. Only the keys are used, never the values; the
config's rank, alpha and other settings still apply, its target_modules / exclude_modules / layer filters do not.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
import torch.nn as nn

from ..config import LoraConfig
from .inject import find_targets

_LORA_PREFIX = ".lora_"
_COMPILED_PREFIX = "_orig_mod."


def modules_in_state_dict(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Module paths that own a ``lora_*`` key, e.g. ``{"model.layers.0.self_attn.q_proj"}``."""
    names = set()
    for key in state_dict:
        if _LORA_PREFIX in key:
            names.add(key.rsplit(_LORA_PREFIX, 1)[0].removeprefix(_COMPILED_PREFIX))
    return names


def config_for_state_dict(config: LoraConfig, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> LoraConfig:
    """A copy of ``config`` targeting exactly the modules the state dict names; RuntimeWarning (PEFT's text) when
    they differ from what the config itself would target."""
    if config.target_parameters:
        raise ValueError(
            "Trying to inject a PEFT adapter from a state_dict but the PEFT config uses `target_parameters`; this is "
            "not supported (as in PEFT). Inject the adapter without the state_dict."
        )
    wanted = modules_in_state_dict(state_dict)
    present = {name for name, _ in model.named_modules() if name}
    found = sorted(wanted & present)
    if not found:
        raise ValueError(
            f"The state_dict names no module of the model with LoRA weights (modules in its keys: {sorted(wanted)[:8]}"
            f"{' ...' if len(wanted) > 8 else ''}); keys must look like '<module path>.lora_A.weight'."
        )
    _warn_if_config_differs(config, model, set(found))
    pattern = "|".join(re.escape(name) for name in found)
    return dataclasses.replace(
        config, target_modules=f"({pattern})", exclude_modules=None, layers_to_transform=None, layers_pattern=None
    )


def _warn_if_config_differs(config: LoraConfig, model: nn.Module, from_state_dict: set[str]) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_config = set(find_targets(model, dataclasses.replace(config)))
    except ValueError:  # the config alone matches nothing
        from_config = set()
    extra_config, extra_state = from_config - from_state_dict, from_state_dict - from_config
    if not (extra_config or extra_state):
        return
    message = (
        "While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and the provided "
        "state_dict. This is not necessarily an issue and can be ignored if this was the intent. "
    )
    if extra_config:
        message += f"The PEFT config contained these additional target modules: {sorted(extra_config)}. "
    if extra_state:
        message += f"The state_dict contained these additional target modules: {sorted(extra_state)}. "
    warnings.warn(message, RuntimeWarning, stacklevel=3)
