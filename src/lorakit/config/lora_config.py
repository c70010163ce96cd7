"""LoraConfig: every field of PEFT's LoRA config, validated, with a JSON round trip in PEFT's format."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .field_checks import check_fields
from .peft_config import PeftConfigMixin, read_json_object
from .sub_configs import SUB_CONFIGS, ArrowConfig, CordaConfig, EvaConfig, LoftQConfig, LoraRuntimeConfig
from .task_type import PeftType, TaskType

CONFIG_NAME = "adapter_config.json"
PEFT_COMPAT_VERSION = "0.21.2"
"""Written as ``peft_version``: the PEFT release whose format and LoRA behaviour lorakit's files follow (not lorakit's
own version). Neither PEFT nor lorakit acts on it for LoRA adapters; it tells a reader which PEFT the file matches."""

BIAS_MODES = ("none", "all", "lora_only")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# Fields of other LoRA variants that lorakit reads and writes back but does not implement: value -> is it unset?
_FOREIGN_VARIANT_DEFAULTS: dict[str, Any] = {
    "lora_ga_config": None,
    "velora_config": None,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "megatron_config": None,
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LoraConfig(PeftConfigMixin):
    """Configuration of a LoRA adapter (arXiv:2106.09685), field for field compatible with PEFT's ``LoraConfig``.

    Unknown keys in a saved config are dropped with a warning; a value lorakit cannot honour raises ``ValueError``.
    """

    task_type: TaskType | str | None = _help("Task of the model: CAUSAL_LM, SEQ_CLS, ...", default=None)
    peft_type: PeftType | str | None = _help("Always LORA.", default=PeftType.LORA)
    auto_mapping: dict | None = _help("Base model class, written when task_type is None.", default=None)
    peft_version: str | None = _help(
        "The PEFT release whose file format and LoRA behaviour the adapter follows: lorakit writes "
        "PEFT_COMPAT_VERSION (0.21.2), not its own version; PEFT writes its own. Informational for LoRA (neither "
        "library changes behaviour on it); read back as written.",
        default=None,
    )
    base_model_name_or_path: str | None = _help("Name or path of the base model.", default=None)
    revision: str | None = _help("Revision of the base model.", default=None)
    inference_mode: bool = _help("Adapter is frozen when True.", default=False)
    r: int = _help("LoRA rank.", default=8)
    target_modules: list[str] | str | None = _help(
        "Module names (exact or dotted suffix), a regex (full match), 'all-linear', or None for the model's defaults.",
        default=None,
    )
    exclude_modules: list[str] | str | None = _help("Modules never targeted (same syntax).", default=None)
    lora_alpha: int | float = _help("Scaling numerator: scaling = lora_alpha / r.", default=8)
    lora_dropout: float = _help("Dropout on the LoRA branch input, in [0, 1).", default=0.0)
    fan_in_fan_out: bool = _help("Base weight stored (in, out), as transformers' Conv1D.", default=False)
    bias: Literal["none", "all", "lora_only"] = _help("Which biases train: none, all, lora_only.", default="none")
    use_rslora: bool = _help("Rank-stabilised scaling lora_alpha / sqrt(r) (arXiv:2312.03732).", default=False)
    modules_to_save: list[str] | None = _help("Modules trained in full and saved with the adapter.", default=None)
    init_lora_weights: bool | str = _help(
        "True (kaiming A, zero B), False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora', 'corda', 'eva', 'loftq', "
        "'orthogonal' or any name registered in lorakit.init.",
        default=True,
    )
    layers_to_transform: list[int] | int | None = _help("Layer indices to adapt.", default=None)
    layers_pattern: list[str] | str | None = _help("Name of the layer list (e.g. 'layers', 'h').", default=None)
    rank_pattern: dict = _help("Regex key -> rank, first match wins.", default_factory=dict)
    alpha_pattern: dict = _help("Regex key -> alpha, first match wins.", default_factory=dict)
    megatron_config: dict | None = _help("Megatron settings (not supported by lorakit).", default=None)
    megatron_core: str | None = _help("Megatron module (not supported by lorakit).", default="megatron.core")
    trainable_token_indices: list[int] | dict[str, list[int]] | None = _help(
        "Token rows of the embedding trained in full.", default=None
    )
    loftq_config: LoftQConfig | dict = _help("LoftQ settings, needed for init 'loftq'.", default_factory=dict)
    eva_config: EvaConfig | None = _help("EVA settings.", default=None)
    corda_config: CordaConfig | None = _help("CorDA settings.", default=None)
    lora_ga_config: dict | None = _help("LoRA-GA settings (not supported by lorakit).", default=None)
    use_dora: bool = _help("Weight-decomposed LoRA (arXiv:2402.09353).", default=False)
    velora_config: dict | None = _help("VeLoRA settings (not supported by lorakit).", default=None)
    alora_invocation_tokens: list[int] | None = _help("aLoRA: token ids that switch the adapter on.", default=None)
    use_qalora: bool = _help("QALoRA (not supported by lorakit).", default=False)
    qalora_group_size: int = _help("QALoRA group size (not supported by lorakit).", default=16)
    monteclora_config: dict | None = _help("MonteCLoRA settings (not supported by lorakit).", default=None)
    layer_replication: list[tuple[int, int]] | None = _help("[start, end) ranges of layers to stack.", default=None)
    runtime_config: LoraRuntimeConfig = _help("Process-local settings, never saved.", default_factory=LoraRuntimeConfig)
    lora_bias: bool = _help("Give lora_B a trainable bias.", default=False)
    target_parameters: list[str] | None = _help("nn.Parameter names to adapt (e.g. MoE experts).", default=None)
    use_bdlora: dict | None = _help("BD-LoRA settings (not supported by lorakit).", default=None)
    arrow_config: ArrowConfig | None = _help("Arrow routing settings.", default=None)
    kasa_config: dict | None = _help("KaSA settings (not supported by lorakit).", default=None)
    ensure_weight_tying: bool = _help("Keep tied embeddings tied for modules_to_save / tokens.", default=False)

    def __post_init__(self) -> None:
        check_fields(self)  # types and ranges of single fields first (field_checks), so later checks see clean values
        self._normalise()
        for check in (
            self._validate_type_and_task,
            self._validate_numbers,
            self._validate_targets,
            self._validate_layers,
            self._validate_init,
            self._validate_variants,
        ):
            check()

    # ------------------------------------------------------------------ normalisation and validation
    def _normalise(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        for name, cls in SUB_CONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict) and value:
                setattr(self, name, cls(**value))
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if self.peft_version is None:  # peft fills this at construction too, so configs compare equal after a reload
            self.peft_version = PEFT_COMPAT_VERSION

    def _validate_type_and_task(self) -> None:
        peft_type = self.peft_type.value if isinstance(self.peft_type, PeftType) else self.peft_type
        if peft_type not in (None, PeftType.LORA.value):
            raise ValueError(f"lorakit only handles LoRA adapters; this config has peft_type={peft_type!r}.")
        self.peft_type = PeftType.LORA
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(f"Unknown task_type {self.task_type!r}; expected one of: {valid}.") from None

    def _validate_numbers(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"`bias` must be one of {BIAS_MODES}, got {self.bias!r}.")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")

    def _validate_targets(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"`{name}` {value!r} is not a valid regular expression: {err}.") from None
            elif value is not None and not all(isinstance(v, str) for v in value):
                raise ValueError(f"`{name}` must be a list of strings or a regex string, got {value!r}.")
        if self.target_parameters is not None and (
            isinstance(self.target_parameters, str) or not all(isinstance(p, str) for p in self.target_parameters)
        ):  # PEFT raises the same TypeError for a string (a list of characters otherwise)
            raise TypeError(
                f"`target_parameters` must be a list of strings or None, got {self.target_parameters!r} (e.g. "
                "['experts.gate_up_proj'])."
            )
        if self.target_modules is not None and not self.target_modules and not self.target_parameters:
            raise ValueError("`target_modules` is an empty list: name at least one module, or use None for defaults.")

    def _validate_layers(self) -> None:
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "`layers_to_transform` and `layers_pattern` only apply to a list of target_modules; with a regex "
                f"target_modules ({self.target_modules!r}) put the layer indices into the regex."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"`layers_pattern` ({self.layers_pattern!r}) is set but `layers_to_transform` is None; "
                "give the layer indices to adapt."
            )
        if self.layer_replication is not None:
            ranges = [tuple(r) for r in self.layer_replication]
            if any(len(r) != 2 or r[0] >= r[1] or r[0] < 0 for r in ranges):
                raise ValueError(f"`layer_replication` must be [start, end) pairs with start < end, got {ranges}.")
            self.layer_replication = [list(r) for r in ranges]

    def _validate_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool):
            pass
        elif not isinstance(init, str):
            raise ValueError(f"`init_lora_weights` must be a bool or a method name, got {init!r}.")
        elif init.startswith("pissa_niter_") and not _PISSA_NITER.fullmatch(init):
            raise ValueError(
                f"`init_lora_weights` {init!r} is malformed: use 'pissa_niter_K' with K a non-negative integer."
            )
        if init == "loftq" and not self.loftq_config:
            raise ValueError("`init_lora_weights='loftq'` needs a `loftq_config` (e.g. LoftQConfig(loftq_bits=4)).")
        if init != "loftq" and self.loftq_config:
            warnings.warn(
                f"loftq_config is ignored because init_lora_weights={init!r} (not 'loftq') and cleared (as in PEFT).",
                stacklevel=3,
            )
            self.loftq_config = {}
        for method, name, default in (("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig)):
            if init == method and getattr(self, name) is None:
                warnings.warn(
                    f"init_lora_weights={method!r} without {name}: using {default.__name__}() defaults.", stacklevel=3
                )
                setattr(self, name, default())
            elif init != method and getattr(self, name) is not None:
                warnings.warn(f"{name} is ignored because init_lora_weights={init!r} (not {method!r}).", stacklevel=3)
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and _converts_base(init):
            warnings.warn(  # PEFT's warning: conversion on save (A' = [A; A0], alpha * sqrt(2)) is refused for these
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of the "
                "base weights; if you intend to do this, please ensure not to use rslora or "
                "rank_pattern/alpha_pattern.",
                stacklevel=3,
            )
        if self.lora_bias and not isinstance(init, bool):
            raise ValueError(f"`lora_bias=True` only works with init_lora_weights True or False, got {init!r}.")

    def _validate_variants(self) -> None:
        if self.lora_bias and self.use_dora:
            raise ValueError("`lora_bias=True` cannot be combined with `use_dora=True`.")
        if self.alora_invocation_tokens is not None and self.task_type not in (None, TaskType.CAUSAL_LM):
            warnings.warn("aLoRA is meant for causal language models (task_type CAUSAL_LM).", stacklevel=3)
        unsupported = [
            name
            for name, unset in _FOREIGN_VARIANT_DEFAULTS.items()
            if getattr(self, name) not in (unset, {}, None, False)
        ]
        if unsupported:
            raise ValueError(
                f"lorakit does not implement the LoRA variant setting(s) {unsupported}; remove them from the config."
            )

    # ------------------------------------------------------------------ derived values
    @property
    def is_prompt_learning(self) -> bool:
        return False

    def pissa_niter(self) -> int | None:
        """K of ``pissa_niter_K`` or None."""
        match = _PISSA_NITER.fullmatch(self.init_lora_weights) if isinstance(self.init_lora_weights, str) else None
        return int(match.group(1)) if match else None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT writes (sets as lists, enums as strings, no runtime_config)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "runtime_config":
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        out["peft_type"] = PeftType.LORA.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from a dict such as a parsed adapter_config.json; unknown keys warn and are dropped."""
        if "peft_type" in data and data["peft_type"] not in (None, PeftType.LORA.value, PeftType.LORA):
            raise ValueError(
                f"This adapter was made with peft_type={data['peft_type']!r}; lorakit only loads LoRA adapters."
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"runtime_config"}
        if "runtime_config" in data:
            warnings.warn("Ignoring runtime_config in adapter_config: it only applies at runtime.", stacklevel=2)
        unknown = sorted(set(data) - known - {"runtime_config"})
        if unknown:
            warnings.warn(f"Ignoring unknown adapter_config keys: {unknown}.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``adapter_config.json`` atomically, fields as they are (PeftModel.save_pretrained is what sets
        ``inference_mode=True``); ``extra`` keys override fields in the written file."""
        from ..io.atomic import atomic_write_text

        data = self.to_dict()
        data.update(extra)
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> LoraConfig:
        """Read ``adapter_config.json`` from a folder or a Hub id; keyword arguments override saved fields."""
        from ..io.hub import resolve_file

        hub_keys = {"revision", "cache_dir", "local_files_only", "token", "force_download"}
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in hub_keys}
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        data = read_json_object(path)
        data.update(kwargs)
        return cls.from_dict(data)


def _converts_base(init: bool | str) -> bool:
    """Inits that move part of W into the adapter (PiSSA, OLoRA, CorDA, LoRA-GA)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "lora_ga"))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (PeftType, TaskType)):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
