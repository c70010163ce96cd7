"""Padding-free batches: ``lorakit train``'s training loop (``cli.trainer.train_steps``) on sequences of realistic,
widely spread lengths, padded vs packed, tokens per second of real (non-pad) tokens.

The data: ``--rows`` sequences of random token ids whose lengths are drawn log-uniform in [16, 1024] (seeded), with
labels on every token (plain text). The model: the bundled demo model's shape (a 4-layer Llama, hidden 256,
intermediate 640, 4 heads, vocabulary 260; lorakit/demo_assets/model) with 1024 positions, randomly initialised,
float32, SDPA attention, LoRA r=8 alpha=16 on all linear layers, fused loss on, as ``lorakit train`` builds it
(packed: SDPA once per sequence of the row, ``lorakit.integrations.packed_sdpa``).

Both runs see the same batches (``--batch-size`` rows per step, the same order), so the same real tokens; only
the layout differs: padded to each batch's longest row (``--no-packing``) or one padding-free row with
position_ids (the default). Each run: ``--warmup`` steps first (not counted), then ``--steps`` timed steps; the
runs alternate ``--rounds`` times and the median tokens/s of each layout is reported, with their ratio. The losses
of the timed steps must agree (packing is exact), and the script says how far apart they are.

    python benchmarks/bench_packing.py                   # about 3 minutes on 2 CPU cores
    python benchmarks/bench_packing.py --steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.cli.data import Encoded
from lorakit.cli.packing import use_packing
from lorakit.cli.progress import NoProgress
from lorakit.cli.train_state import TrainState
from lorakit.cli.trainer import TrainSettings, make_optimizer, train_steps

DEMO_SHAPE = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=260)  # fmt: skip


def log_uniform_rows(n: int, low: int, high: int, vocab: int, seed: int) -> list[Encoded]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        ids = [1] + [rng.randrange(4, vocab) for _ in range(length - 1)]
        rows.append(Encoded(ids, list(ids)))
    return rows


def build(seed: int, packing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**DEMO_SHAPE, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="sdpa")  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))  # fmt: skip
    model.enable_fused_loss()
    if packing:  # as lorakit train: SDPA per sequence of a packed row (lorakit.integrations.packed_sdpa), checked
        assert use_packing(model) is None
    return model


def run(rows: list[Encoded], packing: bool, args: argparse.Namespace) -> tuple[float, float, int, list[float]]:
    """(real tokens per wall second, real tokens per CPU second over the timed steps, their real tokens, their
    losses). CPU time: this process's (``--threads 1``, the default: on a shared machine it leaves out the time
    spent waiting for a core)."""
    model = build(args.seed, packing)
    settings = TrainSettings(lr=1e-3, max_steps=args.warmup, batch_size=args.batch_size, packing=packing)
    optimizer = make_optimizer(model, settings)
    state = TrainState()
    common = dict(device=torch.device("cpu"), pad_id=0, save=lambda: None)
    train_steps(model, optimizer, rows, settings, state, progress=NoProgress(0, 0, sys.stdout), **common)
    tokens, seconds = state.tokens, state.seconds
    settings.max_steps = args.warmup + args.steps
    cpu = time.process_time()
    train_steps(model, optimizer, rows, settings, state, progress=NoProgress(0, 0, sys.stdout), **common)
    cpu = time.process_time() - cpu
    timed = state.tokens - tokens
    return timed / (state.seconds - seconds), timed / cpu, timed, [loss for _, loss in state.losses[args.warmup :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = log_uniform_rows(args.rows, 16, 1024, DEMO_SHAPE["vocab_size"], args.seed)
    lengths = sorted(len(r.input_ids) for r in rows)
    print(f"{len(rows)} sequences, lengths log-uniform 16-1024: median {lengths[len(rows) // 2]}, mean "
          f"{sum(lengths) / len(rows):.0f}, max {lengths[-1]}; batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup}, {args.rounds} rounds, {torch.get_num_threads()} threads")  # fmt: skip
    speeds: dict[bool, list[float]] = {False: [], True: []}
    cpu_speeds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        results = {}
        for packing in (False, True) if round_ % 2 == 0 else (True, False):
            speed, cpu_speed, tokens, _ = results[packing] = run(rows, packing, args)
            speeds[packing].append(speed)
            cpu_speeds[packing].append(cpu_speed)
            print(f"round {round_ + 1} {'packed' if packing else 'padded'}: {speed:,.0f} real tok/s wall, "
                  f"{cpu_speed:,.0f} per CPU second ({tokens} real tokens)", flush=True)  # fmt: skip
        (*_, tokens_padded, loss_padded), (*_, tokens_packed, loss_packed) = results[False], results[True]
        assert tokens_padded == tokens_packed, (tokens_padded, tokens_packed)
        gap = max(abs(a - b) for a, b in zip(loss_padded, loss_packed))
        print(f"  same real tokens ({tokens_packed}); largest difference of the step losses {gap:.1e}")
    for what, table in (("wall", speeds), ("CPU", cpu_speeds)):
        padded, packed = statistics.median(table[False]), statistics.median(table[True])
        print(f"RESULT real tokens per {what} second: padded {padded:,.0f}, packed {packed:,.0f}: "
              f"{packed / padded:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
