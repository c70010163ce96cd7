"""``lorakit generate``: text from a base model with one adapter, several, or none.

    lorakit generate --model M --adapter out/ --prompt "Date 2024-02-29 in words:"
    lorakit generate --model M --adapter dates=a/ --adapter chat=b/ \\
        --prompt "Date 2024-02-29 in words:" --prompt-adapter dates --prompt "Hi" --prompt-adapter chat

When the prompts name different adapters they run as ONE mixed batch (``adapter_names=``, one adapter per row;
``__base__`` means no adapter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CliError

HELP = "generate text with a base model and LoRA adapters (mixed batches when prompts name different adapters)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import ranges as R
    from .loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder or Hub id, repeatable; NAME=DIR names it (the first unnamed one is 'default')",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt, repeatable")
    parser.add_argument("--prompt-file", help="a file with one prompt per line (added after --prompt)")
    parser.add_argument(
        "--prompt-adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="adapter for each prompt, in order (one value = all prompts; '__base__' = no adapter)",
    )
    parser.add_argument("--max-new-tokens", type=R.COUNT, default=64)
    parser.add_argument("--temperature", type=R.NON_NEGATIVE, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--top-p", type=R.TOP_P, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=R.SEED, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CliError(f"--prompt-file {args.prompt_file!r}: no such file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CliError(
                f"--prompt-file {args.prompt_file!r} is not UTF-8 text ({err.reason} at byte {err.start})."
            ) from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CliError("no prompt given; use --prompt TEXT (repeatable) or --prompt-file FILE.")
    return prompts


def route(prompts: list[str], chosen: list[str], loaded: list[str]) -> list[str] | None:
    """The adapter of each prompt (None when no adapter is loaded); checks the names."""
    from .loading import BASE_ADAPTER

    if not loaded:
        if chosen:
            raise CliError("--prompt-adapter needs adapters; load them with --adapter [NAME=]DIR.")
        return None
    if not chosen:
        return [loaded[0]] * len(prompts)
    if len(chosen) == 1:
        chosen = chosen * len(prompts)
    if len(chosen) != len(prompts):
        raise CliError(
            f"{len(chosen)} --prompt-adapter values for {len(prompts)} prompts; give one per prompt, or one for all."
        )
    unknown = sorted({c for c in chosen if c not in loaded and c != BASE_ADAPTER})
    if unknown:
        raise CliError(f"--prompt-adapter names unknown adapters {unknown}; loaded: {loaded} (or {BASE_ADAPTER!r}).")
    return chosen


def generate_all(model: Any, tokenizer: Any, prompts: list[str], routes: list[str] | None, args: Any) -> list[str]:
    """One adapter for all prompts -> activate it; different adapters -> one mixed batch with adapter_names."""
    from .evaluation import generate
    from .loading import BASE_ADAPTER

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if routes is None:
        return generate(model, tokenizer, prompts, **options)
    if len(set(routes)) == 1 and routes[0] != BASE_ADAPTER:
        model.set_adapter(routes[0])
        return generate(model, tokenizer, prompts, **options)
    try:
        return generate(model, tokenizer, prompts, adapter_names=routes, **options)
    except ValueError as err:
        raise CliError(f"mixed-adapter generation failed: {err}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from .loading import load_adapters, load_causal_lm, parse_adapter_specs
    from .sources import check_adapter

    prompts = _prompts(args)
    specs = parse_adapter_specs(args.adapter)
    routes = route(prompts, args.prompt_adapter, [name for name, _ in specs])
    for _, folder in specs:
        check_adapter(folder)  # a mistyped folder fails now, not after loading the model
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args)
    if specs:
        model = load_adapters(model, specs)
    outputs = generate_all(model, tokenizer, prompts, routes, args)
    for i, (prompt, text) in enumerate(zip(prompts, outputs)):
        adapter = routes[i] if routes else None
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": adapter, "completion": text}))
        else:
            print(f"[{adapter or 'base'}] {prompt}{text}")
    sys.stdout.flush()
    return 0
