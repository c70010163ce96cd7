"""Load a causal LM, its tokenizer and adapters for the command line, turning every failure into one clear line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CliError, one_line

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from ..peft_model import PeftModel

DTYPES = ("auto", "float32", "bfloat16", "float16")
BASE_ADAPTER = "__base__"


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="base causal LM: a local folder or a Hugging Face Hub id (cached, or downloaded when online)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights' dtype; auto = float32 on CPU, the checkpoint's dtype elsewhere",
    )


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device {name!r} is not a device name ({one_line(err)}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name!r} asks for CUDA, but this torch build sees no GPU; use --device cpu.")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype | str:
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if name == "checkpoint":
        return "auto"  # transformers' "auto": the dtype the weights are stored in
    return getattr(torch, name)


def resolve_model(model_id: str, revision: str | None = None) -> Path:
    """A local folder holding ``model_id``: the folder itself, or the Hub cache's snapshot (downloaded if online).
    A mistyped local name or an unusable Hub fails at once (``sources.check_source``)."""
    from .sources import check_source

    if not check_source("--model", model_id, bare_is_local=False, cached=lambda _: _cached(model_id, revision)):
        return _cached(model_id, revision) or _download(model_id, revision)
    path = Path(model_id).expanduser()
    if not (path / "config.json").is_file():
        present = sorted(p.name for p in path.iterdir())[:12]
        raise CliError(
            f"--model {model_id!r} is a folder without config.json (it holds: {present or 'nothing'}); "
            "expected a transformers model folder."
        )
    return path


def _cached(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:
        raise CliError(
            f"--model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {one_line(err)[:200]})."
        ) from None


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(path: Path, model_id: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"could not load the tokenizer of {model_id!r}: {one_line(err)[:300]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(f"the tokenizer of {model_id!r} has neither a pad nor an eos token; add one to it.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_causal_lm(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """(model on args.device in eval mode, tokenizer) for ``args.model``; ``config.name_or_path`` is the id given."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    device = pick_device(args.device)
    path = resolve_model(args.model, getattr(args, "revision", None))
    tokenizer = load_tokenizer(path, args.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **{_dtype_kwarg(): pick_dtype(args.dtype, device)})
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"could not load {args.model!r} as a causal language model: {one_line(err)[:300]}") from None
    model.config.name_or_path = args.model
    model.name_or_path = args.model
    return model.to(device).eval(), tokenizer


def parse_adapter_specs(values: list[str]) -> list[tuple[str, str]]:
    """``DIR`` or ``NAME=DIR`` -> (name, dir); an unnamed first adapter is ``default``, later ones take the folder
    name."""
    specs: list[tuple[str, str]] = []
    for i, value in enumerate(values):
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = ("default" if i == 0 else Path(value).name), value
        if not name or not folder:
            raise CliError(f"--adapter {value!r}: expected DIR or NAME=DIR.")
        if name in (n for n, _ in specs):
            raise CliError(f"--adapter: the name {name!r} is given twice; name them NAME=DIR.")
        if name == BASE_ADAPTER or "." in name:
            raise CliError(f"--adapter: {name!r} cannot name an adapter (no dots, not {BASE_ADAPTER!r}).")
        specs.append((name, folder))
    return specs


def load_adapters(model: nn.Module, specs: list[tuple[str, str]]) -> PeftModel:
    """The model with every adapter of ``specs`` loaded (frozen, eval mode); the first one is active."""
    from ..peft_model import PeftModel
    from .sources import check_adapter

    for _, folder in specs:
        check_adapter(folder)
    peft_model: PeftModel | None = None
    for name, folder in specs:
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                peft_model.load_adapter(folder, adapter_name=name)
        except (OSError, ValueError, KeyError) as err:
            raise CliError(f"could not load adapter {folder!r}: {one_line(err)[:400]}") from None
    assert peft_model is not None
    return peft_model.eval()
