"""Command-line flags for every ``LoraConfig`` field, generated from the dataclass fields and their help text.

A field ``target_modules`` becomes ``--target-modules``; a few have short aliases (``--alpha``, ``--dora``, ...).
How a value is read follows the field's annotation (``VALUE_READERS``); an annotation without a reader takes JSON,
so a field added to LoraConfig later is reachable without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

from ..config import LoraConfig

ALIASES: dict[str, tuple[str, ...]] = {
    "r": ("--rank",),
    "lora_alpha": ("--alpha",),
    "lora_dropout": ("--dropout",),
    "init_lora_weights": ("--init",),
    "use_dora": ("--dora",),
    "use_rslora": ("--rslora",),
}

NOT_ON_COMMAND_LINE: dict[str, str] = {
    "task_type": "always CAUSAL_LM for `lorakit train`",
    "peft_type": "always LORA",
    "auto_mapping": "written on save",
    "peft_version": "written on save",
    "base_model_name_or_path": "taken from --model",
    "revision": "taken from --revision",
    "inference_mode": "False while training, True on save",
    "runtime_config": "process-local, never saved",
    "megatron_config": "Megatron is not supported",
    "megatron_core": "Megatron is not supported",
    "lora_ga_config": "LoRA-GA is not implemented by lorakit",
    "velora_config": "VeLoRA is not implemented by lorakit",
    "use_qalora": "QALoRA is not implemented by lorakit",
    "qalora_group_size": "QALoRA is not implemented by lorakit",
    "monteclora_config": "MonteCLoRA is not implemented by lorakit",
    "use_bdlora": "BD-LoRA is not implemented by lorakit",
    "kasa_config": "KaSA is not implemented by lorakit",
}
"""Fields without a flag, and why (a test checks that every other field has one)."""

PREFIX = "lora_"
"""Namespace prefix of the parsed values (``args.lora_r``), so they never clash with training options."""


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({err.msg})") from None


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _names_or_regex(text: str) -> list[str] | str:
    """``a,b`` -> [a, b] (exact names or dotted suffixes); ``all-linear``; ``re:PATTERN`` -> a regex (full match)."""
    if text.lower() == "all-linear":
        return "all-linear"
    if text.startswith("re:"):
        return text[3:]
    return _names(text)


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _ints(text: str) -> list[int]:
    if text.lstrip().startswith("["):
        value = _json(text)
    else:
        value = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ints_or_int(text: str) -> list[int] | int:
    values = _ints(text)
    return values[0] if len(values) == 1 and "," not in text and "[" not in text else values


def _mapping(text: str) -> dict[str, Any]:
    """``key=value,key=value`` (values read as numbers when they look like numbers) or a JSON object."""
    if text.lstrip().startswith("{"):
        value = _json(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.rpartition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {part!r}")
        try:
            out[key] = _number(raw)
        except ValueError:
            out[key] = raw
    return out


def _init_value(text: str) -> bool | str:
    lowered = text.lower()
    if lowered in ("true", "default", "kaiming"):
        return True
    if lowered in ("false", "none", "random"):
        return False
    return text


VALUE_READERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "int | float": _number,
    "str | None": str,
    "bool | str": _init_value,
    "list[str] | str | None": _names_or_regex,
    "list[str] | None": _names,
    "list[int] | int | None": _ints_or_int,
    "list[int] | None": _ints,
    "dict": _mapping,
}
"""Annotation (as written in LoraConfig) -> reader of one command-line value; anything else reads JSON."""

_VALUE_HINTS: dict[str, str] = {
    "int": "N",
    "float": "X",
    "int | float": "X",
    "list[str] | str | None": "A,B | all-linear | re:REGEX",
    "list[str] | None": "A,B",
    "list[int] | int | None": "N,M",
    "list[int] | None": "N,M",
    "dict": "KEY=V,KEY=V | JSON",
    "bool | str": "true|false|NAME",
}


def _literal_choices(annotation: str) -> list[str] | None:
    match = re.fullmatch(r"Literal\[(.*)\]", annotation)
    return [c.strip().strip("'\"") for c in match.group(1).split(",")] if match else None


def flag_fields() -> list[dataclasses.Field]:
    """LoraConfig fields that get a flag, in declaration order."""
    return [f for f in dataclasses.fields(LoraConfig) if f.name not in NOT_ON_COMMAND_LINE]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _ranged(name: str, read: Callable[[str], Any]) -> Callable[[str], Any]:
    """``read`` followed by the range check of field ``name`` (``ranges.LORA_FIELDS`` / ``LORA_MAPPING_VALUES``)."""
    from .ranges import LORA_FIELDS, LORA_MAPPING_VALUES

    def read_value(text: str) -> Any:
        return LORA_FIELDS[name].check(read(text), repr(text))

    def read_mapping(text: str) -> Any:
        value = read(text)
        for key, item in value.items():
            LORA_MAPPING_VALUES[name].check(item, f"{key}={item!r}")
        return value

    for wrapper in (read_value, read_mapping):
        wrapper.__name__ = getattr(read, "__name__", "value")  # argparse names it in "invalid <name> value: ..."
    return read_value if name in LORA_FIELDS else read_mapping if name in LORA_MAPPING_VALUES else read


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per LoraConfig field (see the module docstring); values land in ``args.lora_<field>``."""
    group = parser.add_argument_group("LoRA options (LoraConfig fields; unset flags keep LoraConfig's defaults)")
    for f in flag_fields():
        names = (f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, ()))
        help_text = f"{f.metadata.get('help', '')} Default: {_default_text(f)}."
        kwargs: dict[str, Any] = {"dest": PREFIX + f.name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = str(f.type)
        choices = _literal_choices(annotation)
        if annotation == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _ranged(f.name, VALUE_READERS.get(annotation, _json))
            kwargs["metavar"] = _VALUE_HINTS.get(annotation, "JSON" if annotation not in VALUE_READERS else "TEXT")
        group.add_argument(*names, **kwargs)


def lora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LoraConfig fields given on the command line, by field name."""
    return {key[len(PREFIX) :]: value for key, value in vars(args).items() if key.startswith(PREFIX)}


def lora_config_from_args(args: argparse.Namespace, **fixed: Any) -> LoraConfig:
    """A LoraConfig from the flags given (others keep their defaults) plus ``fixed`` fields such as task_type."""
    from .errors import CliError, one_line

    kwargs = lora_kwargs(args) | fixed
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise CliError(f"invalid LoRA options: {one_line(err)}") from None
