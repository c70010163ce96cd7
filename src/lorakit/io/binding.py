"""The weights file names the config it was saved with, so a loader can tell whether a folder's files belong together.

``save_pretrained`` writes the text of ``adapter_config.json`` into the weights file itself: a safetensors metadata
entry, or an attribute of the ``.bin`` file's OrderedDict (``torch.load(weights_only=True)`` restores it). PEFT
ignores both, and ``adapter_config.json`` gains no key (PEFT would warn about an unknown one). A loader compares the
config it is about to use with the one the weights name; a weights file without the entry (saved by PEFT or an older
lorakit) cannot be checked and is taken as it is.

Fields that do not change what the weights mean (the base model's name or revision, the PEFT version, the inference
flag, the task type, ``auto_mapping``) may differ: people point ``base_model_name_or_path`` at a local copy by hand.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

METADATA_KEY = "lorakit.adapter_config"
BIN_METADATA_ATTR = "lorakit_metadata"
IGNORED_FIELDS = frozenset(
    {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "task_type", "auto_mapping"}
)


def saved_config(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The config dict a weights file was saved with, or None when its metadata names none."""
    text = (metadata or {}).get(METADATA_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the weights file's {METADATA_KEY!r} metadata entry is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"the weights file's {METADATA_KEY!r} metadata entry is not a JSON object")
    return data


def _normalised(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as LoraConfig reads and writes it back (a missing field and its default compare equal)."""
    from ..config import LoraConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig.from_dict(dict(data)).to_dict()
    except Exception:  # a config LoraConfig refuses is refused later with its own error; compare it as written
        return json.loads(json.dumps(dict(data), default=str))


def differing_fields(saved: Mapping[str, Any], used: Mapping[str, Any]) -> list[str]:
    """Fields (outside IGNORED_FIELDS) whose values differ between two config dicts."""
    a, b = _normalised(saved), _normalised(used)
    return sorted(k for k in (set(a) | set(b)) - IGNORED_FIELDS if a.get(k) != b.get(k))


def check_belongs(saved: Mapping[str, Any] | None, used: Mapping[str, Any], weights: str, config: str) -> None:
    """Raise when ``used`` (the config a loader is about to apply) is not the one the weights were saved with."""
    if saved is None:
        return
    fields = differing_fields(saved, used)
    if not fields:
        return
    shown = ", ".join(f"{k} (weights: {saved.get(k)!r}, config: {used.get(k)!r})" for k in fields[:4])
    more = f" and {len(fields) - 4} more" if len(fields) > 4 else ""
    raise ValueError(
        f"{weights} and {config} do not belong together: the weights were saved with another adapter config "
        f"({shown}{more}). The folder mixes two saves (an interrupted or concurrent save by another tool, or files "
        "copied by hand); save the adapter again. To apply a different config on purpose, pass it as "
        "from_pretrained(..., config=LoraConfig(...))."
    )
