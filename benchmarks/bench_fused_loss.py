"""Fused loss: a training step with a 128k vocabulary, lorakit (``enable_fused_loss``) vs peft (full logits).

The model: a 2-layer Llama shape built from ``LlamaConfig`` (hidden 512, intermediate 1408, 8 heads, 2 kv heads)
with the Llama-3 vocabulary (128,256, untied head), float32, LoRA r=16 alpha=32 on all linear layers (lm_head
excluded, as "all-linear" does in both libraries), identical adapter weights in both (seeded by name, B != 0). A
step: forward with ``labels = input_ids`` (B2 x T1024), backward, AdamW step.

* time: both libraries in one process, steps interleaved round by round (alternating who goes first), median of
  ``--steps`` after ``--warmup``; wall time and this thread's CPU time (``--threads 1``, the default: on a shared
  machine the CPU time does not count waiting for a core);
* memory: one fresh subprocess per case, the same method for all: peak RSS of the process (``ru_maxrss``) over
  model build, one warm-up step and one measured step, and its growth over the RSS just before the first step
  (what the step itself adds: activations, logits, gradients, optimizer state).

Cases: ``peft`` (ordinary loss), ``lorakit`` (fused loss), ``lorakit-plain`` (lorakit's ordinary loss, memory only
unless ``--time-plain``). The losses of the first step are printed for each: they must agree.

    python benchmarks/bench_fused_loss.py                            # ~5 minutes on 2 shared CPU cores
    python benchmarks/bench_fused_loss.py --seq 256 --steps 2        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from cases.common import llama_model, lora_kwargs

SHAPE = dict(hidden=512, layers=2, intermediate=1408, heads=8, kv_heads=2, vocab=128256)
CASES = ("peft", "lorakit", "lorakit-plain")


def build(case: str, args: argparse.Namespace):
    """(model, optimizer) for ``case``: the base seeded, the adapters seeded by name (identical across libs)."""
    lib = __import__("peft" if case == "peft" else "lorakit")
    base = llama_model({**SHAPE, "vocab": args.vocab}, "cpu", torch.float32, max_positions=max(2048, args.seq))
    base.requires_grad_(False)
    model = lib.get_peft_model(base, lib.LoraConfig(**lora_kwargs()))
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sorted(params):
            params[name].copy_(torch.randn(params[name].shape, generator=gen) * 0.02)
    if case == "lorakit":
        model.enable_fused_loss(chunk_size=args.chunk_size)
    model.train()
    return model, torch.optim.AdamW(params.values(), lr=1e-4)


def batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model, optimizer, inputs) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, args: argparse.Namespace) -> None:
    """One case in this (fresh) process: print its memory figures as JSON."""
    torch.set_num_threads(args.threads)
    model, optimizer = build(case, args)
    inputs = batch(args)
    before = rss_mib()
    loss = train_step(model, optimizer, inputs)
    train_step(model, optimizer, inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "rss_before_mib": before, "peak_rss_mib": peak, "loss": loss}))


def memory(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--child", case, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(out.strip().splitlines()[-1])
        r = results[case]
        grow = r["peak_rss_mib"] - r["rss_before_mib"]
        print(
            f"memory {case:14s} peak RSS {r['peak_rss_mib']:8.0f} MiB  step adds {grow:8.0f} MiB  loss {r['loss']:.6f}",
            flush=True,
        )
    return results


def timing(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    cases = ["peft", "lorakit"] + (["lorakit-plain"] if args.time_plain else [])
    built = {case: build(case, args) for case in cases}
    inputs = batch(args)
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for case in cases if i % 2 == 0 else cases[::-1]:
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = train_step(*built[case], inputs)
            t1, c1 = time.perf_counter(), time.thread_time()
            losses.setdefault(case, loss)
            if i >= args.warmup:
                wall[case].append(t1 - t0)
                cpu[case].append(c1 - c0)
    results = {}
    for case in cases:
        results[case] = {"wall_s": statistics.median(wall[case]), "cpu_s": statistics.median(cpu[case])}
        print(
            f"time   {case:14s} step wall {results[case]['wall_s']:7.3f} s  cpu {results[case]['cpu_s']:7.3f} s"
            f"  (min wall {min(wall[case]):.3f})  first loss {losses[case]:.6f}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: lorakit's)")
    parser.add_argument("--only", choices=("memory", "time"), default=None)
    parser.add_argument("--time-plain", action="store_true", help="also time lorakit's ordinary loss")
    parser.add_argument("--child", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    print(f"B{args.batch} x T{args.seq}, vocab {args.vocab}, threads {args.threads}, torch {torch.__version__}")
    if args.only != "time":
        mem = memory(args)
        ratio = mem["lorakit"]["peak_rss_mib"] / mem["peft"]["peak_rss_mib"]
        grow = (mem["lorakit"]["peak_rss_mib"] - mem["lorakit"]["rss_before_mib"]) / (
            mem["peft"]["peak_rss_mib"] - mem["peft"]["rss_before_mib"]
        )
        print(f"memory lorakit / peft: peak RSS {ratio:.2f}x, step growth {grow:.2f}x")
    if args.only != "memory":
        t = timing(args)
        print(
            f"time   lorakit / peft: wall {t['lorakit']['wall_s'] / t['peft']['wall_s']:.2f}x, "
            f"cpu {t['lorakit']['cpu_s'] / t['peft']['cpu_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
