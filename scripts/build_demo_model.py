"""Build the small pretrained causal LM that ``lorakit demo`` fine-tunes, and write it to the demo assets.

    python scripts/build_demo_model.py                      # CPU or GPU, whichever is there
    python scripts/build_demo_model.py --steps 200 --out /tmp/m   # a quick smoke run

What it makes (all of it generated here, so it can be redistributed with the repository):
- a byte-level tokenizer built with the ``tokenizers`` library (256 byte symbols, no merges, plus <pad> <s> </s>
  <unk>), saved as a ``PreTrainedTokenizerFast`` with a small chat template;
- a ``LlamaForCausalLM`` of about 3 million parameters (4 layers, hidden 256), pretrained from scratch on an
  endless stream of templated English (``demo_text.pretraining_document``), saved in bfloat16 safetensors.

At the end it reloads the saved files, prints the held-out loss and a few greedy continuations, so the log shows
the model is genuinely pretrained.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "lorakit" / "demo_assets" / "model"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """Byte-level BPE with no merges: every byte is one token, so any text encodes without <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


class TokenStream:
    """Endless packed blocks of ``<s> document </s>`` token ids, from a seeded generator of documents."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.buffer: list[int] = []

    def block(self, length: int) -> list[int]:
        while len(self.buffer) < length:
            text = demo_text.pretraining_document(self.rng)
            self.buffer += self.tokenizer(text, verbose=False)["input_ids"] + [self.tokenizer.eos_token_id]
        out, self.buffer = self.buffer[:length], self.buffer[length:]
        return out

    def batch(self, batch_size: int, length: int) -> torch.Tensor:
        """(batch_size, length) token ids."""
        return torch.tensor([self.block(length) for _ in range(batch_size)])


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, batch: torch.Tensor, device: str) -> float:
    model.eval()
    loss = model(input_ids=batch.to(device), labels=batch.to(device)).loss.item()
    model.train()
    return loss


def pretrain(model, tokenizer, args: argparse.Namespace) -> None:
    device = args.device
    model.to(device).train()
    stream, valid = TokenStream(tokenizer, args.seed), TokenStream(tokenizer, args.seed + 1).batch(64, args.block)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    on_gpu = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    start, tokens = time.time(), 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = stream.batch(args.batch_size, args.block).to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            rate = tokens / (time.time() - start)
            print(
                f"step {step:5d}  loss {loss.item():.3f}  held-out {held_out_loss(model, valid, device):.3f}  "
                f"{rate:,.0f} tok/s",
                flush=True,
            )


def show_samples(model, tokenizer, device: str) -> None:
    prompts = ["Month 04 is", "Ada was born on", "12 + 30 =", "Where does Milo live? Milo lives in", "2031-05-09:"]
    model.eval()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"  {prompt!r} -> {tokenizer.decode(out[0, ids['input_ids'].shape[1] :], skip_special_tokens=True)!r}")


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the generic fast-tokenizer class, which transformers 4.x and 5.x both load."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the model and tokenizer to")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=640)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; pretraining on {args.device}", flush=True)
    pretrain(model, tokenizer, args)
    model.to("cpu").to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    _portable_tokenizer_config(args.out)
    print(f"saved to {args.out}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    valid = TokenStream(tokenizer, args.seed + 1).batch(64, args.block)
    print(f"reloaded (bf16 weights, fp32 compute): held-out loss {held_out_loss(reloaded, valid, 'cpu'):.3f}")
    show_samples(reloaded, tokenizer, "cpu")


if __name__ == "__main__":
    main()
