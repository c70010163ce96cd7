"""Training data for ``lorakit train``: read JSONL or plain text, tokenise with loss masks, split, batch.

Accepted JSONL lines (one JSON object per line, blank lines skipped):
- ``{"prompt": ..., "completion": ...}``: loss on the completion only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template (or a simple
  ``<|role|>content`` template when it has none); loss on the assistant turns only;
- ``{"text": ...}``: loss on every token.
Any other file is plain text: paragraphs (separated by blank lines) are documents, loss on every token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CliError

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class Example:
    """Text segments with a flag "the loss covers this segment"; ``prompt``/``completion`` for exact-match eval."""

    segments: list[tuple[str, bool]]
    prompt: str | None = None
    completion: str | None = None


@dataclass
class Encoded:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,), IGNORE_INDEX where the loss does not apply


# ---------------------------------------------------------------- reading
def _prompt_completion(row: dict, where: str) -> Example:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise CliError(f"{where}: 'prompt' and 'completion' must be strings.")
    if not completion:
        raise CliError(f"{where}: 'completion' is empty; there is nothing to train on.")
    return Example([(prompt, False), (completion, True)], prompt=prompt, completion=completion)


def _messages(row: dict, where: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise CliError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CliError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise CliError(f"{where}: no message has role 'assistant'; there is nothing to train on.")
    return _ChatExample(messages)


def _text(row: dict, where: str) -> Example:
    if not isinstance(row["text"], str) or not row["text"]:
        raise CliError(f"{where}: 'text' must be a non-empty string.")
    return Example([(row["text"], True)])


class _ChatExample(Example):
    """Segments are filled in by ``encode`` once the tokenizer (and its chat template) is known."""

    def __init__(self, messages: list[dict[str, str]]) -> None:
        super().__init__(segments=[])
        self.messages = messages


ROW_FORMATS: dict[tuple[str, ...], Callable[[dict, str], Example]] = {
    ("prompt", "completion"): _prompt_completion,
    ("messages",): _messages,
    ("text",): _text,
}
"""Keys a JSONL object must have -> reader; first match wins."""


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CliError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(row, dict):
                raise CliError(f"{where}: expected a JSON object, got {type(row).__name__}.")
            reader = next((fn for keys, fn in ROW_FORMATS.items() if all(k in row for k in keys)), None)
            if reader is None:
                formats = " or ".join("+".join(repr(k) for k in keys) for keys in ROW_FORMATS)
                raise CliError(f"{where}: expected keys {formats}; found {sorted(row)}.")
            examples.append(reader(row, where))
    return examples


def _read_text(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [Example([(p, True)]) for p in paragraphs if p]


def read_examples(path_text: str, flag: str = "--data") -> list[Example]:
    """Examples of a JSONL or text file; one-line errors for a missing file, bad JSON (file:line) or bad fields."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise CliError(f"{flag} {path_text!r}: no such file.")
    if not path.is_file():
        raise CliError(f"{flag} {path_text!r} is not a file.")
    try:
        examples = _read_jsonl(path) if path.suffix.lower() in JSONL_SUFFIXES else _read_text(path)
    except UnicodeDecodeError as err:
        raise CliError(f"{flag} {path_text!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not examples:
        raise CliError(f"{flag} {path_text!r} holds no examples.")
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded random ``fraction`` is held out (at least one example when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------- tokenising
def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_segments(tokenizer: Any, messages: list[dict]) -> tuple[list[tuple[str, bool]], str, str]:
    """Segments of a rendered conversation (assistant turns trained) + (prompt, completion) of its last turn."""
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = completion = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise CliError("the chat template does not render conversations incrementally; use prompt/completion.")
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done, prompt, completion = after, before, after[len(before) :]
    if len(done) < len(_render(tokenizer, messages, generation_prompt=False)):
        segments.append((_render(tokenizer, messages, generation_prompt=False)[len(done) :], False))
    return [s for s in segments if s[0]], prompt, completion


def encode(example: Example, tokenizer: Any, max_length: int) -> Encoded | None:
    """Token ids and labels (loss only on trained segments, eos after the last one); None if nothing is trained."""
    segments = example.segments
    if isinstance(example, _ChatExample):
        segments, example.prompt, example.completion = chat_segments(tokenizer, example.messages)
    ids: list[int] = []
    labels: list[int] = []
    bos = tokenizer.bos_token
    for i, (text, trained) in enumerate(segments):
        special = i == 0 and not (bos and text.startswith(bos))
        piece = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if tokenizer.eos_token_id is not None and segments and segments[-1][1] and ids[-1:] != [tokenizer.eos_token_id]:
        ids.append(tokenizer.eos_token_id)  # the model learns to stop after a completion
        labels.append(tokenizer.eos_token_id)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(ids, labels)


def encode_all(examples: list[Example], tokenizer: Any, max_length: int, what: str) -> list[Encoded]:
    """Encode ``examples``; long plain-text documents are cut into ``max_length`` chunks. Warns about drops."""
    import warnings

    out: list[Encoded] = []
    dropped = 0
    for example in examples:
        if len(example.segments) == 1 and example.segments[0][1] and example.prompt is None:
            out += _chunks(example.segments[0][0], tokenizer, max_length)
            continue
        encoded = encode(example, tokenizer, max_length)
        if encoded is None:
            dropped += 1
        else:
            out.append(encoded)
    if dropped:
        warnings.warn(
            f"{dropped} {what} examples have no completion tokens left within --max-length {max_length}; skipped.",
            stacklevel=2,
        )
    if not out:
        raise CliError(f"no usable {what} examples (every one was empty or longer than --max-length {max_length}).")
    return out


def _chunks(text: str, tokenizer: Any, max_length: int) -> list[Encoded]:
    ids = tokenizer(text, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Encoded(p, list(p)) for p in pieces if len(p) > 1]


# ---------------------------------------------------------------- batching
def collate(rows: list[Encoded], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, T): T = ``width`` when given (a fixed shape,
    e.g. for a CUDA-graph step), else the longest row's length."""
    import torch

    longest = max(len(r.input_ids) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"collate: width {width} is shorter than the longest row ({longest} tokens).")
    width = width or longest
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run
    continues with exactly the batches an uninterrupted run would have seen."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_at(
    rows: list[Encoded], step: int, batch_size: int, seed: int, pad_id: int, width: int | None = None
) -> dict[str, Any]:
    """The batch of optimiser step ``step`` (0-based); the last partial batch of an epoch is dropped. ``width``:
    pad to that many tokens (see ``collate``)."""
    return collate([rows[i] for i in batch_indices(len(rows), step, batch_size, seed)], pad_id, width)


def batch_indices(n_rows: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Which rows make the batch of ``step`` (see ``batch_at``): a function of (seed, step) alone."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(n_rows, seed, epoch)
    return order[index * batch_size : (index + 1) * batch_size] or order[:batch_size]


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, n_rows // batch_size)


def eval_batches(rows: list[Encoded], batch_size: int, pad_id: int) -> list[dict[str, Any]]:
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}
