"""``lorakit merge``: fold an adapter into the base weights and save a standalone transformers model.

    lorakit merge --model M --adapter my-adapter --out merged/

The result loads with ``AutoModelForCausalLM.from_pretrained("merged/")`` (the tokenizer is saved beside it). Before
saving, the merged model's logits on a probe text are compared with the adapter model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import CliError

HELP = "merge an adapter into its base model and save a standalone transformers model"
PROBE = "The quick brown fox jumps over the lazy dog. 2024-02-29: 12 + 30 = 42."
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
"""Allowed max |logit difference| relative to (1 + max |logit|) after merging; other dtypes get 2e-2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--adapter", required=True, help="adapter folder or Hub id")
    parser.add_argument("--out", required=True, help="folder for the merged model and its tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--no-check", action="store_true", help="skip comparing merged and adapter logits")
    parser.add_argument("--no-safe-merge", action="store_true", help="skip the NaN/inf check of merged weights")


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file; give a folder.")
    held = [n for n in ("config.json", "model.safetensors", "adapter_config.json") if (out / n).exists()]
    if held and not overwrite:
        raise CliError(f"--out {str(out)!r} already holds a model ({', '.join(held)}); pass --overwrite to replace it.")


def _probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(PROBE, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return model(**ids).logits.float()


def merge(args: argparse.Namespace) -> tuple[Any, Any, float | None]:
    """(merged model, tokenizer, max |logit difference| or None when unchecked)."""
    from .errors import one_line
    from .loading import load_adapters, load_causal_lm

    if args.dtype == "auto":
        args.dtype = "checkpoint"  # save the merged model in the dtype the base was stored in
    model, tokenizer = load_causal_lm(args)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    peft_model = load_adapters(model, [("default", args.adapter)])
    reference = None if args.no_check else _probe_logits(peft_model, tokenizer)
    try:
        merged = peft_model.merge_and_unload(safe_merge=not args.no_safe_merge)
    except ValueError as err:
        raise CliError(f"cannot merge {args.adapter!r}: {one_line(err)}") from None
    if reference is None:
        return merged, tokenizer, None
    diff = (_probe_logits(merged, tokenizer) - reference).abs().max().item()
    allowed = TOLERANCE.get(dtype, 2e-2) * (1.0 + reference.abs().max().item())
    if not diff <= allowed:
        raise RuntimeError(f"the merged model's logits differ from the adapter model's by {diff:.3g} (> {allowed:.3g})")
    return merged, tokenizer, diff


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    check_out(out, args.overwrite)
    merged, tokenizer, diff = merge(args)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    check = "" if diff is None else f"; logits match the adapter model's (max |diff| {diff:.2e})"
    print(f"merged {args.adapter} into {args.model} and saved a standalone model to {out}{check}")
    return 0
