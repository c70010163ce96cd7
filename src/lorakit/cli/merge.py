"""``lorakit merge``: fold an adapter into the base weights and save a standalone transformers model.

    lorakit merge --model M --adapter my-adapter --out merged/

The result loads with ``AutoModelForCausalLM.from_pretrained("merged/")`` (the tokenizer is saved beside it). Before
saving, the merged model's logits on a probe text are compared with the adapter model's.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CliError

HELP = "merge an adapter into its base model and save a standalone transformers model"
PROBE = "The quick brown fox jumps over the lazy dog. 2024-02-29: 12 + 30 = 42."
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
"""Allowed max |logit difference| relative to (1 + max |logit|) after merging; other dtypes get 2e-2."""
MODEL_FILES = (
    "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "adapter_config.json", "adapter_model.*",
)  # fmt: skip
"""Weight and adapter files: one left beside the merged model (not replaced by it) could be loaded instead of it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--adapter", required=True, help="adapter folder or Hub id")
    parser.add_argument("--out", required=True, help="folder for the merged model and its tokenizer")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that is not empty: replaces files of the same names, deletes nothing",
    )
    parser.add_argument("--no-check", action="store_true", help="skip comparing merged and adapter logits")
    parser.add_argument("--no-safe-merge", action="store_true", help="skip the NaN/inf check of merged weights")


@dataclass
class Check:
    """What the merged model was compared with: logits on ``tokens`` probe tokens, both models in ``dtype``."""

    dtype: str
    tokens: int
    diff: float
    allowed: float

    def __str__(self) -> str:
        return (
            f"merged vs adapter model on a {self.tokens}-token probe text, both in {self.dtype}: max |logit diff| "
            f"{self.diff:.3g} (allowed in {self.dtype}: {self.allowed:.3g})"
        )


def check_out(out: Path, overwrite: bool) -> None:
    """Without --overwrite the folder must be new or empty; in any case writable (checked before merging)."""
    from .output_dir import ensure_writable, foreign_entries, listing

    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file; give a folder.")
    held = foreign_entries(out)
    if held and not overwrite:
        raise CliError(
            f"--out {str(out)!r} is not empty (it holds {listing(held)}); choose an empty folder, or pass --overwrite "
            "to replace files of the same names (nothing is deleted)."
        )
    ensure_writable(out)


def refuse_stale_models(out: Path, written: list[str]) -> None:
    """Weight or adapter files in ``out`` that the new model does not replace: refuse (merge never deletes)."""
    stale = sorted(
        p.name for p in out.iterdir() if p.name not in written and any(fnmatch.fnmatch(p.name, m) for m in MODEL_FILES)
    )
    if stale:
        raise CliError(
            f"--out {str(out)!r} holds {', '.join(stale)}, which the merged model ({', '.join(sorted(written))}) "
            "would not replace, so the folder could load them instead; merge never deletes files: remove them or "
            "choose another folder."
        )


def _probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(PROBE, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return model(**ids).logits.float()


def merge(args: argparse.Namespace) -> tuple[Any, Any, Check | None]:
    """(merged model, tokenizer, the logit comparison or None when unchecked)."""
    from .errors import one_line
    from .loading import load_adapters, load_causal_lm
    from .sources import check_adapter

    check_adapter(args.adapter)  # a mistyped folder fails now, not after loading the model
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
    check = Check(dtype, reference.shape[1], diff, allowed)
    if not diff <= allowed:
        raise RuntimeError(f"the merged model's logits differ from the adapter model's: {check}")
    return merged, tokenizer, check


def run(args: argparse.Namespace) -> int:
    from .output_dir import publish, staging
    from .sources import check_adapter

    out = Path(args.out).expanduser()
    check_adapter(args.adapter)
    check_out(out, args.overwrite)
    merged, tokenizer, check = merge(args)
    with staging(out) as staged:
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        written = sorted(p.name for p in staged.iterdir())
        refuse_stale_models(out, written)
        publish(staged, out, last=("config.json",))
    saved = str(merged.dtype).removeprefix("torch.")
    compared = f"checked: {check}" if check else "not checked (--no-check)"
    print(f"merged {args.adapter} into {args.model}; saved a standalone {saved} model to {out} ({compared})")
    return 0
