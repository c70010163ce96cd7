"""Initialisation time, lorakit vs peft side by side in one process: PiSSA, pissa_niter_4, OLoRA, CorDA, EVA.

    python benchmarks/bench_init.py                                   # CPU profile: small Llama shape, < 1 min
    python benchmarks/bench_init.py --profile gpu --device cuda       # TinyLlama-1.1B shape, bf16 weights

Every run starts from a fresh copy of the same randomly initialised model. Timed: ``get_peft_model`` (plus
``preprocess_corda`` on the calibration batches for CorDA; ``get_peft_model(low_cpu_mem_usage=True)`` plus
``initialize_lora_eva_weights`` for EVA). First, every method of both libraries runs once untimed on a one-layer
model (lazy imports, solver handles); then each library runs a method ``--warmup`` times untimed (first calls on the
real shapes grow the allocator); then the libraries alternate and the best of ``--repeats`` is reported.
``--budget-s`` caps the seconds spent per method (its later warm-ups and repeats are skipped; the first timed round
always runs), and every run's time is printed (flushed) as it completes, so a run killed by a time limit keeps what
it measured. One timed round of all five methods on an H200 takes about 7 minutes, most of it peft's EVA (~200 s):

    python benchmarks/bench_init.py --profile gpu --device cuda --warmup 0 --repeats 2 --budget-s 20 \
        --methods olora pissa_niter_4 pissa corda eva --json gpu_init.json

EVA runs until the components converge, which on a randomly initialised model takes many batches; the profiles use
a lower tau than EvaConfig's 0.99 (``--eva-tau`` overrides it) so a run stays short. Both libraries do the same steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
import types
import warnings
from collections.abc import Callable

import torch

from cases.common import llama_model

PROFILES = {
    "cpu": dict(
        hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=512, r=8, eva_r=4, eva_tau=0.9,
        dtype="float32", calib_samples=8, calib_len=128, eva_batches=8, eva_batch=4, eva_len=128,
    ),
    "gpu": dict(
        hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, r=16, eva_r=16, eva_tau=0.95,
        dtype="bfloat16", calib_samples=16, calib_len=512, eva_batches=16, eva_batch=4, eva_len=512,
    ),
}  # fmt: skip
METHODS = ["pissa", "pissa_niter_4", "olora", "corda", "eva"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(p: dict, device: str) -> torch.nn.Module:
    dtype = getattr(torch, p["dtype"])
    return llama_model(p, device, dtype, max(p["calib_len"], p["eva_len"])).eval()


def data(p: dict, device: str) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(1)
    calib = [
        torch.randint(0, p["vocab"], (1, p["calib_len"]), generator=g).to(device) for _ in range(p["calib_samples"])
    ]
    eva = []
    for _ in range(p["eva_batches"]):
        ids = torch.randint(0, p["vocab"], (p["eva_batch"], p["eva_len"]), generator=g)
        eva.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return calib, eva


def peft_corda_module():
    """peft's CorDA imports the optional ``attr`` package for one dataclass; stand in for it when missing."""
    try:
        import attr  # noqa: F401
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora import corda

    return corda


def runner(lib: str, method: str, p: dict, calib, eva_data) -> Callable[[torch.nn.Module], object]:
    """A function that initialises ``model`` with ``method`` using library ``lib`` ("lorakit" or "peft")."""
    if lib == "lorakit":
        import lorakit as mod

        preprocess, eva_init = mod.preprocess_corda, mod.initialize_lora_eva_weights
        extra = {"corda": mod.CordaConfig(), "eva": mod.EvaConfig(tau=p["eva_tau"])}
    else:
        import peft as mod

        preprocess, eva_init = peft_corda_module().preprocess_corda, mod.initialize_lora_eva_weights
        extra = {"corda": mod.tuners.lora.config.CordaConfig(), "eva": mod.EvaConfig(tau=p["eva_tau"])}

    def run(model):
        r = p["eva_r"] if method == "eva" else p["r"]
        kwargs = dict(target_modules=TARGETS, r=r, lora_alpha=2 * r, init_lora_weights=method)
        if method == "corda":
            config = mod.LoraConfig(**kwargs, corda_config=extra["corda"])
            preprocess(model, config, run_model=lambda: [model(x) for x in calib])
            return mod.get_peft_model(model, config)
        if method == "eva":
            config = mod.LoraConfig(**kwargs, eva_config=extra["eva"])
            peft_model = mod.get_peft_model(model, config, low_cpu_mem_usage=True)
            eva_init(peft_model, eva_data, show_progress_bar=False)
            return peft_model
        return mod.get_peft_model(model, mod.LoraConfig(**kwargs))

    return run


def timed(fn: Callable[[torch.nn.Module], object], template: torch.nn.Module, device: str) -> float:
    model = copy.deepcopy(template)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        fn(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return elapsed


def prime(methods: list[str], p: dict, device: str) -> None:
    """Untimed: run every method of both libraries once on a one-layer model of the same dtype, so first-call costs
    (lazy imports, cuSOLVER/cuBLAS handles, LAPACK) are paid before timing, also with ``--warmup 0``."""
    tiny_p = dict(p, hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, r=4, eva_r=4, calib_samples=2)
    tiny_p["eva_tau"] = min(p["eva_tau"], 0.9)
    tiny = build_model(tiny_p, device)
    calib, eva_data = data(tiny_p, device)
    spent = []
    for method in methods:
        start = time.perf_counter()
        for lib in ("lorakit", "peft"):
            timed(runner(lib, method, tiny_p, calib, eva_data[:2]), tiny, device)
        spent.append(f"{method} {time.perf_counter() - start:.1f} s")
    print(f"primed both libraries on a 1-layer model: {', '.join(spent)}", flush=True)


def bench_method(method: str, args, p: dict, template, calib, eva_data) -> dict:
    """Warm-up, then alternating timed repeats, until ``args.budget_s`` seconds have been spent on this method (the
    first timed round always runs, so every method gets a figure). Each run's time is printed as it completes."""
    best = {"lorakit": float("inf"), "peft": float("inf")}
    start = time.perf_counter()

    def spent() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    def one(lib: str, label: str) -> float:
        elapsed = timed(runner(lib, method, p, calib, eva_data), template, args.device)
        print(f"  {method} {lib:<8}{label}: {elapsed:.3f} s", flush=True)
        return elapsed

    warmups = repeats = 0
    for w in range(args.warmup):
        if spent():
            break
        for lib in best:
            one(lib, f"warmup {w + 1}")
        warmups += 1
    for i in range(args.repeats):
        if i > 0 and spent():
            break
        for lib in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
            best[lib] = min(best[lib], one(lib, f"repeat {i + 1}"))
        repeats += 1
    note = ""
    if (warmups, repeats) != (args.warmup, args.repeats):
        note = f"budget {args.budget_s:g} s spent: warmup {warmups}/{args.warmup}, repeats {repeats}/{args.repeats}"
    return {"method": method, "lorakit_s": best["lorakit"], "peft_s": best["peft"], "warmup": warmups,
            "repeats": repeats, "note": note}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per method (>= 1); best one reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per library and method before timing")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="seconds per method: once spent, its remaining warm-up and repeats are skipped (the first timed round "
        "always runs); the result line says what ran",
    )
    parser.add_argument("--eva-tau", type=float, help="override the profile's EVA convergence threshold")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this JSON file (rewritten after every method)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got --repeats {args.repeats} --warmup {args.warmup}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    import lorakit

    p = dict(PROFILES[args.profile])
    if args.eva_tau is not None:
        p["eva_tau"] = args.eva_tau
    template = build_model(p, args.device)
    calib, eva_data = data(p, args.device)
    prime(args.methods, p, args.device)
    n_params = sum(t.numel() for t in template.parameters())
    print(
        f"profile={args.profile} device={args.device} params={n_params / 1e6:.1f}M dtype={p['dtype']} r={p['r']} "
        f"eva_r={p['eva_r']} eva_tau={p['eva_tau']} "
        f"torch={torch.__version__} lorakit={lorakit.__version__} peft={peft.__version__} "
        f"threads={torch.get_num_threads()} warmup={args.warmup} repeats={args.repeats} budget_s={args.budget_s}",
        flush=True,
    )
    meta = {"profile": args.profile, "device": args.device, "machine": platform.platform(), **p}
    rows = []
    for method in args.methods:
        row = bench_method(method, args, p, template, calib, eva_data)
        rows.append(row)
        print(f"{'method':<14}{'lorakit s':>12}{'peft s':>12}{'speed-up':>10}", flush=True)
        lk, pf = row["lorakit_s"], row["peft_s"]
        print(f"{method:<14}{lk:>12.3f}{pf:>12.3f}{pf / lk:>9.2f}x  {row['note']}", flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
