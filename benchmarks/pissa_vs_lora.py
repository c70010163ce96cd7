"""PiSSA (arXiv:2404.02948) vs default LoRA: same model, data, seed, rank, alpha and optimiser; which loss falls faster?

    python benchmarks/pissa_vs_lora.py            # ~15 s on 2 CPU cores

A small Llama-shaped model is first trained in full on one synthetic language (a random sparse Markov chain) so
its weights have structure; it is then adapted with LoRA to a second chain that shares half of the first one's
transitions. Both adapters see the same batches in the same order; only ``init_lora_weights`` differs.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import lorakit


def markov_chain(vocab: int, fan_out: int, seed: int) -> torch.Tensor:
    """(vocab, vocab) transition matrix: every token goes to ``fan_out`` random successors."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab, vocab)
    for token in range(vocab):
        nxt = torch.randperm(vocab, generator=g)[:fan_out]
        probs[token, nxt] = torch.rand(fan_out, generator=g) + 0.1
    return probs / probs.sum(1, keepdim=True)


def sample(chain: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.empty(batch, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, chain.shape[0], (batch,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(chain[ids[:, t - 1]], 1, generator=g)[:, 0]
    return ids


def build(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train(model, chain, steps: int, lr: float, seed: int, log_every: int = 0) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        ids = sample(chain, 16, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  pretrain step {step + 1}: loss {loss.item():.3f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    vocab = 128
    first, second = markov_chain(vocab, 4, seed=10), markov_chain(vocab, 4, seed=11)
    target = first.clone()
    target[vocab // 2 :] = second[vocab // 2 :]  # half of the transitions change

    start = time.perf_counter()
    base = build(vocab)
    pre = train(base, first, args.pretrain_steps, lr=3e-3, seed=0)
    print(f"pretrained on chain 1 in {time.perf_counter() - start:.1f} s: loss {pre[0]:.3f} -> {pre[-1]:.3f}")

    curves = {}
    for init in (True, "pissa"):
        model = copy.deepcopy(base)
        config = lorakit.LoraConfig(
            target_modules="all-linear", r=args.r, lora_alpha=args.r, init_lora_weights=init, task_type="CAUSAL_LM"
        )
        torch.manual_seed(args.seed)
        peft_model = lorakit.get_peft_model(model, config)
        curves["lora" if init is True else "pissa"] = train(peft_model, target, args.steps, args.lr, seed=args.seed)

    marks = sorted({0, 9, 24, 49, args.steps // 2 - 1, args.steps - 1})
    print(f"\nfine-tune on chain 2: r={args.r}, alpha={args.r}, AdamW lr={args.lr}, {args.steps} steps, batch 16x32")
    print(f"{'step':>6}{'LoRA loss':>12}{'PiSSA loss':>12}")
    for i in marks:
        print(f"{i + 1:>6}{curves['lora'][i]:>12.3f}{curves['pissa'][i]:>12.3f}")
    for name, curve in curves.items():
        reached = next((i + 1 for i, loss in enumerate(curve) if loss < 3.0), None)
        tail = sum(curve[-10:]) / 10
        print(f"{name}: first step with loss < 3.0: {reached}; mean loss over the last 10 steps: {tail:.3f}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
