"""peft with and without ``lorakit.patch_peft``, side by side in one process on the same model and adapters.

    python benchmarks/bench_patch_peft.py                    # CPU profile (2 cores, a few minutes)
    python benchmarks/bench_patch_peft.py --profile gpu      # the H200 profile: 1.1B Llama shape, bf16
    python benchmarks/bench_patch_peft.py --profile smoke    # seconds: checks the harness

Cases (one peft model each, built by ``cases.common.wrap_peft``: r=16, all-linear, random adapters):

* ``train``: a LoRA AdamW training step (lora_dropout 0: dropout in training keeps peft's forward);
* ``train dora``: the same with ``use_dora=True``;
* ``mixed decode``: one decode step of a mixed batch (every row its own adapter of ``adapters``, peft's
  ``adapter_names=``), timed as in ``cases/inference.py`` ((generate(1 + n) - generate(1)) / n).

The same model object is timed unpatched and patched, rounds alternating (``patch_peft`` / ``unpatch_peft`` are
cheap), so load from other processes hits both alike; each side's figure is its best round (CPU) or median (CUDA).
The CPU-time columns give this thread's CPU time for the same calls (one torch thread on CPU profiles: the work runs
in this thread), which a busy shared host inflates far less than wall time.
``check`` is the relative error of the patched output against peft's (training: step-0 logits; decode: the generated
tokens, equal or not).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lorakit
from cases.common import (
    PROFILES,
    adapter_state,
    build_llama,
    fmt_ms,
    load_adapter_state,
    rel_err,
    synchronize,
    wrap_peft,
)
from cases.inference import _decode_ids, _names


def _clocked(fn, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call of ``fn``: the median on CUDA, the minimum on CPU. CPU ms is this thread's CPU
    time (with one torch thread the work runs in this thread), which other processes on a shared host do not
    inflate; on CUDA it is the host's share."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        synchronize(device)
        walls.append((time.perf_counter() - wall) * 1e3)
        cpus.append((time.thread_time() - cpu) * 1e3)
    pick = statistics.median if device.type == "cuda" else min
    return pick(walls), pick(cpus)


def _alternate(model, measure, rounds: int, device: torch.device) -> tuple[float, float, float, float]:
    """(peft ms, patched ms, peft CPU ms, patched CPU ms): ``measure()`` -> (wall, cpu) in alternating rounds on the
    unpatched and the patched model; each side's best round (CPU) or median round (CUDA)."""
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for patched in (False, True):
            if patched:
                lorakit.patch_peft(model)
            runs[patched].append(measure())
            if patched:
                lorakit.unpatch_peft(model)
    pick = statistics.median if device.type == "cuda" else min
    return (
        pick(r[0] for r in runs[False]),
        pick(r[0] for r in runs[True]),
        pick(r[1] for r in runs[False]),
        pick(r[1] for r in runs[True]),
    )


def train_case(base, profile: dict, device: torch.device, dora: bool) -> tuple[float, float, str]:
    import peft

    torch.manual_seed(1)
    config = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    model = peft.get_peft_model(base, peft.LoraConfig(**config)).train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, profile["vocab"], (profile["train_batch"], profile["train_seq"]), generator=gen).to(device)
    start = adapter_state(model)
    logits = {}
    for patched in (False, True):
        if patched:
            lorakit.patch_peft(model)
        with torch.no_grad():
            logits[patched] = model(input_ids=ids).logits.float()
        if patched:
            lorakit.unpatch_peft(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def measure() -> tuple[float, float]:
        return _clocked(step, device, profile["steps"], profile["warmup"])

    ms = _alternate(model, measure, profile.get("rounds", 3), device)
    load_adapter_state(model, start)
    base = model.unload()
    return *ms, f"logits rel err {rel_err(logits[True], logits[False]):.1e}"


def decode_case(base, profile: dict, device: torch.device) -> tuple[float, float, str]:
    model = wrap_peft(base, n_adapters=profile["adapters"]).eval()
    names = _names(profile["decode_batch"], profile["adapters"])
    ids = _decode_ids(profile, device)
    tokens = {}
    for patched in (False, True):
        if patched:
            lorakit.patch_peft(model)
        with torch.inference_mode():
            tokens[patched] = model.generate(
                input_ids=ids, max_new_tokens=profile["decode_tokens"], do_sample=False, pad_token_id=0,
                adapter_names=names,
            )  # fmt: skip
        if patched:
            lorakit.unpatch_peft(model)
    n = profile["decode_tokens"]

    def generate(tokens: int) -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                adapter_names=names,
            )  # fmt: skip

    def measure() -> tuple[float, float]:  # one decode step: (generate(1 + n) - generate(1)) / n, as cases/inference
        one, full = _clocked(lambda: generate(1), device, 3, 1), _clocked(lambda: generate(1 + n), device, 2, 1)
        return (full[0] - one[0]) / n, (full[1] - one[1]) / n

    ms = _alternate(model, measure, profile.get("rounds", 3), device)
    model.unload()
    same = torch.equal(tokens[True], tokens[False])
    return (
        *ms,
        f"{profile['adapters']} adapters, {profile['decode_batch']} rows; tokens {'equal' if same else 'DIFFER'}",
    )


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--cases", default="train,train dora,mixed decode")
    parser.add_argument("--rounds", type=int, default=3)
    # 1 by default: on a shared 2-core host (load above the core count) OpenMP's barriers make every batched
    # matmul (bmm, the gathered mixed-batch kernel) wait for a descheduled thread, ~30 ms instead of 0.01 ms
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU profiles)")
    args = parser.parse_args()
    if args.profile != "gpu":
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.profile == "gpu" else "cpu")
    profile = dict(PROFILES[args.profile], rounds=args.rounds)
    base = build_llama(profile, device)
    runs = {
        "train": lambda: train_case(base, profile, device, dora=False),
        "train dora": lambda: train_case(base, profile, device, dora=True),
        "mixed decode": lambda: decode_case(base, profile, device),
    }
    wanted = [c.strip() for c in args.cases.split(",")]
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(runs)}")
    command = " ".join(["python benchmarks/bench_patch_peft.py", *sys.argv[1:]])
    print(f"{datetime.date.today()} · commit {_commit()} · `{command}` · torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {_device_name(device)}")  # fmt: skip
    print("| case | peft ms | patched ms | speed-up | peft CPU ms | patched CPU ms | speed-up (CPU time) | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in wanted:
        peft_ms, patched_ms, peft_cpu, patched_cpu, note = runs[case]()
        print(
            f"| {case} | {fmt_ms(peft_ms)} | {fmt_ms(patched_ms)} | {peft_ms / patched_ms:.2f}x | {fmt_ms(peft_cpu)} "
            f"| {fmt_ms(patched_cpu)} | {peft_cpu / patched_cpu:.2f}x | {note} |"
        )


if __name__ == "__main__":
    main()
