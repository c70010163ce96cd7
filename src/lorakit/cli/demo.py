"""``lorakit demo`` (and ``make demo``): the embedded default run, end to end, in about a minute on a CPU.

It runs ``lorakit train`` on the small pretrained model and the task data that ship in ``lorakit/demo_assets``
(see its README: a 3M-parameter Llama pretrained on generated text; the task is writing ISO dates in words), shows
the exact-match accuracy on held-out dates and a few generations before and after, writes the adapter and the loss
plot, then reloads the adapter from disk and checks that it reproduces the trained model's outputs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HELP = "fine-tune the bundled pretrained model on the bundled task; show the metric before/after"
TRY_PROMPT = "Date 2024-02-29 in words:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import ranges as R
    from .progress import DISPLAYS

    parser.add_argument("--out", default="runs/demo", help="folder for the adapter and plot (default runs/demo)")
    parser.add_argument("--steps", type=R.COUNT, default=80, help="optimiser steps (default 80)")
    parser.add_argument("--batch-size", type=R.COUNT, default=32)
    parser.add_argument("--lr", type=R.LEARNING_RATE, default=5e-3)
    parser.add_argument("--r", type=R.COUNT, default=8, help="LoRA rank (alpha = 2r, all linear layers)")
    parser.add_argument(
        "--eval-limit", type=R.DEMO_EVAL_LIMIT, default=-1, help="held-out prompts to score (-1 = all 100)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=R.COUNT, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=R.SEED, default=0)
    parser.add_argument("--progress", default="auto", choices=("auto", *DISPLAYS), help="progress display")


def assets() -> Path:
    from importlib.resources import files

    return Path(str(files("lorakit") / "demo_assets"))


def train_argv(args: argparse.Namespace) -> list[str]:
    root = assets()
    argv = [
        "--model", str(root / "model"),
        "--data", str(root / "task" / "train.jsonl"),
        "--eval-data", str(root / "task" / "heldout.jsonl"),
        "--out", args.out, "--overwrite",
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--warmup-ratio", "0.1", "--eval-every", "20", "--seed", str(args.seed), "--device", args.device,
        "--r", str(args.r), "--alpha", str(2 * args.r), "--target-modules", "all-linear",
        "--eval-generate", str(args.eval_limit), "--show-examples", "4", "--progress", args.progress,
    ]  # fmt: skip
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def _parse_train(argv: list[str]) -> argparse.Namespace:
    from . import train
    from .errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="lorakit train")
    train.add_arguments(parser)
    ns = parser.parse_args(argv)
    ns.debug = False
    return ns


def reload_check(outcome: Any, args: argparse.Namespace) -> tuple[int, int, float]:
    """Load the saved adapter onto a fresh base model: (identical generations, total, max |logit difference|)."""
    import torch

    from ..peft_model import PeftModel
    from .evaluation import generate
    from .loading import load_causal_lm

    ns = argparse.Namespace(model=str(assets() / "model"), revision=None, device=args.device, dtype="auto")
    base, tokenizer = load_causal_lm(ns)
    reloaded = PeftModel.from_pretrained(base, str(outcome.out))
    prompts = [p for p, _ in outcome.pairs]
    trained = outcome.after.exact_match.outputs
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in outcome.pairs)
    again = generate(reloaded, tokenizer, prompts, max_new_tokens=longest + 2)
    inputs = tokenizer(prompts[:16], return_tensors="pt", padding=True).to(base.device)
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - outcome.model(**inputs).logits).abs().max().item()
    return sum(a == b for a, b in zip(again, trained)), len(prompts), diff


def run(args: argparse.Namespace) -> int:
    from . import train

    start = time.perf_counter()
    argv = train_argv(args)
    print("lorakit demo: fine-tune a small pretrained LM (bundled) to write ISO dates in words, with LoRA")
    print("$ lorakit train " + shlex.join(argv), flush=True)
    outcome = train.train(_parse_train(argv))
    if not outcome.completed:
        sys.stderr.write(
            f"lorakit demo: interrupted ({outcome.stopped_by}); checkpoint in {outcome.out / 'checkpoint'}\n"
        )
        return outcome.exit_code
    same, total, diff = reload_check(outcome, args)
    before, after = outcome.before.exact_match, outcome.after.exact_match
    print(f"reloaded {outcome.out}: {same}/{total} generations identical to the trained model's, max |logit diff| "
          f"{diff:.1e}")  # fmt: skip
    print(
        f"RESULT exact match on {total} held-out dates: {100 * before.accuracy:.0f}% before -> "
        f"{100 * after.accuracy:.0f}% after {outcome.steps} LoRA steps ({outcome.seconds:.0f} s of training); "
        f"held-out loss {outcome.before.loss:.3f} -> {outcome.after.loss:.3f}"
    )
    print(f"adapter: {outcome.out}/adapter_model.safetensors   plot: {outcome.plot}")
    print(
        "try:   lorakit generate --model "
        + shlex.join([str(assets() / "model"), "--adapter", str(outcome.out), "--prompt", TRY_PROMPT])
    )
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    learned = outcome.after.loss < outcome.before.loss
    if same != total or diff > 1e-3 or not learned:
        problem = "the reloaded adapter differs from the trained one" if learned else "the held-out loss did not fall"
        sys.stderr.write(f"lorakit demo: FAILED: {problem}\n")
        return 1
    return 0
