"""Held-out loss and exact-match generation, used before and after training (and by the demo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .data import IGNORE_INDEX, to_device


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean cross-entropy per trained token over all batches (token-weighted, not batch-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # (B, T, V) predicts token t+1 from position t
        shifted, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += loss.item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@contextlib.contextmanager
def left_padding(tokenizer: Any) -> Iterator[None]:
    """Decoder-only generation needs prompts padded on the left."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    adapter_names: list[str] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, special tokens removed); greedy when temperature is 0."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        with left_padding(tokenizer):
            inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        kwargs: dict[str, Any] = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names[start : start + batch_size]
        ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            do_sample=bool(sampling),
            **{k: v for k, v in sampling.items() if k != "do_sample"},
            **kwargs,
        )
        out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


@dataclass
class ExactMatch:
    correct: int
    total: int
    outputs: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} ({100 * self.accuracy:.0f}%)"


def exact_match(
    model: nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], max_new_tokens: int | None = None
) -> ExactMatch:
    """Greedy completions of each prompt compared with the expected completion (whitespace-stripped)."""
    if not pairs:
        return ExactMatch(0, 0)
    if max_new_tokens is None:
        longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in pairs)
        max_new_tokens = longest + 2
    outputs = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens)
    correct = sum(out.strip() == want.strip() for out, (_, want) in zip(outputs, pairs))
    return ExactMatch(correct, len(pairs), outputs)
