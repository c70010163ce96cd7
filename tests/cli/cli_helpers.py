"""Tiny on-disk models, tokenizers and data for driving the CLI in-process (``main([...])``)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast over printable ASCII (about 100 tokens), built with tokenizers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_lm_dir(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 32) and the char tokenizer to ``folder``; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_tiny(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def task_rows(n: int = 24) -> list[dict[str, str]]:
    words = ["cat", "dog", "sun", "sky", "red", "box", "pen", "cup"]
    return [{"prompt": f"Copy {words[i % 8]}{i}:", "completion": f" {words[i % 8]}{i}"} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lorakit ARGV`` run in this process."""
    from lorakit.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--data", data, "--out", out, "--max-steps", "4", "--batch-size", "4",
        "--lr", "1e-2", "--progress", "none", "--eval-fraction", "0.2", "--plot", "none", *extra,
    ]  # fmt: skip
