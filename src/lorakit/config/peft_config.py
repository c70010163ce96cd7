"""PeftConfig: PEFT's method-independent config base, with ``from_pretrained`` dispatching on ``peft_type``.

``PeftConfig.from_pretrained(path)`` returns the config class that ``peft_type`` names (only LORA here), as PEFT
does; ``LoraConfig`` is registered as a virtual subclass, so ``isinstance(LoraConfig(), PeftConfig)`` holds. The
JSON helpers (``from_json_file``, ``from_peft_type``) are shared with LoraConfig through ``PeftConfigMixin``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .task_type import PeftType, TaskType


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the config file ``path``; ValueError naming the path for bad JSON, non-UTF-8 text or
    anything but an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); an adapter config is UTF-8 JSON.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


CONFIG_FILE = "adapter_config.json"
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "repo_type")

PEFT_TYPE_TO_CONFIG: dict[str, type] = {}
"""``peft_type`` string -> config class; ``config/__init__`` registers LoraConfig."""


def _config_file(path_or_id: str | os.PathLike, subfolder: str | None, hub: dict[str, Any]) -> Path:
    """Local path of adapter_config.json in a folder or a Hub repo (through huggingface_hub's cache)."""
    local = Path(path_or_id) / subfolder if subfolder else Path(path_or_id)
    if (local / CONFIG_FILE).is_file():
        return local / CONFIG_FILE
    if local.is_dir():
        present = sorted(p.name for p in local.iterdir())
        raise FileNotFoundError(f"No {CONFIG_FILE} in {str(local)!r}; the folder holds: {present or 'nothing'}.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path_or_id), CONFIG_FILE, subfolder=subfolder, **hub))
    except Exception as err:  # invalid id, offline without cache, missing repo or file
        raise FileNotFoundError(
            f"Can't find {CONFIG_FILE} at {str(path_or_id)!r}"
            + (f" (subfolder {subfolder!r})" if subfolder else "")
            + f": it is not a local adapter folder and the Hub did not provide it ({type(err).__name__}: {err})."
        ) from None


class PeftConfigMixin:
    """Class methods every config shares: JSON reading and dispatch on ``peft_type``."""

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The parsed JSON object of a config file (a dict, as in PEFT), ``runtime_config`` removed with a warning."""
        del kwargs
        path = Path(path_json_file)
        data = read_json_object(path)
        if "runtime_config" in data:
            warnings.warn(
                f"{path} contains a runtime_config; it is ignored (runtime settings only apply at runtime).",
                stacklevel=2,
            )
            del data["runtime_config"]
        return data

    @classmethod
    def _get_peft_type(cls, model_id: str | os.PathLike, **hub_kwargs: Any) -> str:
        """The ``peft_type`` written in ``model_id``'s adapter_config.json; ValueError when it has none."""
        subfolder = hub_kwargs.pop("subfolder", None)
        path = _config_file(model_id, subfolder, {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS})
        return peft_type_of(cls.from_json_file(path), str(path))

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> Any:
        """Build the config class that ``kwargs['peft_type']`` names (``cls`` itself when there is none)."""
        if "peft_type" not in kwargs:
            return cls(**kwargs)
        config_cls = config_class(kwargs["peft_type"])
        return config_cls.from_dict(kwargs) if hasattr(config_cls, "from_dict") else config_cls(**kwargs)


def peft_type_of(data: dict[str, Any], source: str) -> str:
    """``data['peft_type']`` as a string; a config without one is refused (PEFT cannot load it either)."""
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f'{source} has no \'peft_type\'; an adapter config must name its method (for LoRA: "peft_type": "LORA").'
        )
    return peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)


def config_class(peft_type: str | PeftType) -> type:
    """The registered config class of ``peft_type``; ValueError naming the supported types otherwise."""
    key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)
    if key not in PEFT_TYPE_TO_CONFIG:
        raise ValueError(
            f"peft_type {key!r} is not supported by lorakit; supported: {', '.join(sorted(PEFT_TYPE_TO_CONFIG))}."
        )
    return PEFT_TYPE_TO_CONFIG[key]


@dataclass
class PeftConfig(PeftConfigMixin, metaclass=abc.ABCMeta):
    """PEFT's base config: the fields every method has. ``from_pretrained`` returns the concrete config."""

    auto_mapping: dict | None = field(default=None, metadata={"help": "Base model class, when task_type is None."})
    peft_version: str | None = field(default=None, metadata={"help": "Version that wrote the config."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Name or path of the base model."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    peft_type: PeftType | str | None = field(default=None, metadata={"help": "The adapter method."})
    task_type: TaskType | str | None = field(default=None, metadata={"help": "Task of the model."})
    inference_mode: bool = field(default=False, metadata={"help": "Adapter is frozen when True."})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> Any:
        """Read adapter_config.json from a folder or a Hub id and build the config its ``peft_type`` names."""
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        path = _config_file(pretrained_model_name_or_path, subfolder, hub)
        data = cls.from_json_file(path)
        config_cls = config_class(peft_type_of(data, str(path)))
        return config_cls.from_dict({**kwargs, **data})

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (v.value if isinstance(v := getattr(self, f.name), (PeftType, TaskType)) else v)
            for f in dataclasses.fields(self)
        }

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def get_peft_config(config_dict: dict[str, Any]) -> Any:
    """A config object from a dict (as PEFT's ``get_peft_config``): the class ``config_dict['peft_type']`` names."""
    return config_class(peft_type_of(config_dict, "config_dict"))(**config_dict)
