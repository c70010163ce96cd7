"""DoRA training step, lorakit vs peft, side by side in one process on the same model and inputs.

Cases: the frozen floor (forward + backward to the input embeddings only), plain LoRA and DoRA for each library.
Each case wraps the same base model (unloaded again afterwards), sets the adapter weights to the same seeded values
in both libraries (so step-0 losses must agree), then times full AdamW training steps.

Reported per case: median ms/step, ratio to the floor, peak memory (CUDA: torch.cuda.max_memory_allocated),
activation bytes saved for backward (excluding parameters; measured in one extra untimed step with
saved_tensors_hooks, on any device), and the step-0 loss.

    python benchmarks/bench_dora.py                          # CPU profile (2 cores, ~1 min)
    python benchmarks/bench_dora.py --profile gpu            # the H200 profile: 1.1B Llama shape, bf16, B4 x T2048
    python benchmarks/bench_dora.py --profile gpu --cases floor,peft-dora,lorakit-dora --steps 10
    python benchmarks/bench_dora.py --layer --dim 1024 --tokens 2048   # one Linear, cases interleaved round by round

``--layer`` times forward + backward of a single d x d Linear (no optimizer) with the cases run in alternation, so
that load from other processes hits all of them alike (use it on a busy machine), and counts the aten ops each case
dispatches per step (a TorchDispatchMode counter; on a GPU each op costs host time).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cases.common import llama_model

PROFILES = {
    # the performance issue's model: hidden 2048, 16 layers, intermediate 5632, 32 heads, 8 kv heads, vocab 32000
    "gpu": dict(
        hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8, vocab=32000, batch=4, seq=2048, dtype="bf16"
    ),
    "cpu": dict(
        hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4, vocab=2048, batch=2, seq=256, dtype="fp32"
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASES = ("floor", "peft-lora", "lorakit-lora", "peft-dora", "lorakit-dora")


@dataclass
class Result:
    case: str
    ms: float
    ms_min: float
    peak_gib: float | None
    saved_gib: float
    loss: float


def build_model(profile: dict, device: str, dtype: torch.dtype):
    """transformers' SDPA attention under a name whose mask stays ``is_causal`` inside a CUDA-graph capture too
    (``lorakit.integrations.causal_sdpa``; eager steps identical to "sdpa"): every case here is causal, unpadded."""
    from lorakit.integrations.causal_sdpa import register_causal_sdpa

    return llama_model(profile, device, dtype, max(2048, profile["seq"]), attn_implementation=register_causal_sdpa())


def lora_config(lib, dora: bool):
    return lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora)


def seed_adapters(model: torch.nn.Module, shared: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Give both libraries the same adapter values (their key names agree): the first library to run moves its B
    away from zero (so DoRA's norm matters) and records its adapter tensors; the second loads them."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        if shared is None:
            g = torch.Generator().manual_seed(1)
            for name, p in sorted(trainable.items()):
                if "lora_B" in name:
                    p.add_((torch.randn(p.shape, generator=g) * 0.01).to(device=p.device, dtype=p.dtype))
            return {n: p.detach().clone() for n, p in trainable.items()}
        if set(shared) != set(trainable):
            raise RuntimeError("peft and lorakit disagree on the adapter parameter names.")
        for name, p in trainable.items():
            p.copy_(shared[name])
        return shared


@contextlib.contextmanager
def saved_bytes_counter(params: set[int]) -> Iterator[dict[str, int]]:
    """Count the bytes of distinct storages autograd saves for backward, parameters excluded."""
    seen: dict[int, int] = {}
    stats = {"bytes": 0}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
            stats["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield stats


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(
    step: Callable[[], float], device: str, steps: int, warmup: int, params: set[int], reset_peak: bool = True
) -> tuple[float, float, float | None, float, float]:
    """``reset_peak=False`` for a CUDA-graph step: its activations were allocated during the capture (before this
    call), and a replay allocates nothing, so the peak must include the capture."""
    loss0 = step()  # first step: the loss of the seeded weights
    with saved_bytes_counter(params) as saved:
        step()
    for _ in range(warmup):
        step()
    sync(device)
    if device.startswith("cuda") and reset_peak:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return statistics.median(times), min(times), peak, saved["bytes"] / 2**30, loss0


_DEFAULTS: dict[str, object] = {}


def apply_setting(setting: str) -> None:
    """A case's suffix (A/B in one process): ``MODE`` sets LORAKIT_DORA_TRITON (0, auto, 1), ``chunks=C`` the fused
    LoRA node's weight-gradient split (``lora_linear.WGRAD_CHUNKS``), ``shared=0|1`` the shared-input groups
    (``shared_inputs.ENABLED``); no suffix, ``graph`` (the step as a CUDA graph, ``make_*_step(graph=True)``) or
    ``autocast`` (the forward under bfloat16 autocast, ``make_train_step(autocast=True)``): the defaults."""
    from lorakit.kernels import dora_triton, lora_linear, shared_inputs

    _DEFAULTS.setdefault("mode", dora_triton.MODE)
    _DEFAULTS.setdefault("chunks", lora_linear.WGRAD_CHUNKS)
    _DEFAULTS.setdefault("shared", shared_inputs.ENABLED)
    dora_triton.MODE, lora_linear.WGRAD_CHUNKS = _DEFAULTS["mode"], _DEFAULTS["chunks"]
    shared_inputs.ENABLED = _DEFAULTS["shared"]
    if setting.startswith("shared="):
        shared_inputs.ENABLED = setting == "shared=1"
    elif setting.startswith("chunks="):
        lora_linear.WGRAD_CHUNKS = int(setting.removeprefix("chunks="))
    elif setting and setting not in ("graph", "autocast"):
        dora_triton.MODE = setting
        dora_triton.use_triton(torch.zeros(1))  # validates the mode


def make_train_step(model, ids: torch.Tensor, graph: bool = False, autocast: bool = False) -> Callable[[], float]:
    """An AdamW step; ``graph``: forward + backward replayed as a CUDA graph (``CudaGraphStep``), AdamW eager;
    ``autocast``: the forward under bfloat16 autocast, as the transformers Trainer's ``bf16=True`` runs it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    if graph:
        from lorakit.integrations.cuda_graphs import CudaGraphStep

        forward_backward = CudaGraphStep(model, {"input_ids": ids, "labels": ids})  # same tokens every step
    else:

        def forward_backward() -> torch.Tensor:
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

    def step() -> float:
        loss = forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_floor_step(model, ids: torch.Tensor, graph: bool = False) -> Callable[[], float]:
    """Forward + backward to the input embeddings; ``graph``: as a CUDA graph (the embeddings computed once)."""
    embed = model.get_input_embeddings()
    if graph:
        from lorakit.integrations.cuda_graphs import CudaGraphStep

        batch = {"inputs_embeds": embed(ids).detach().requires_grad_(True), "labels": ids}
        replay = CudaGraphStep(model, batch)
        return lambda: replay().item()

    def step() -> float:
        inputs = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=inputs, labels=ids).loss
        loss.backward()
        return loss.item()

    return step


def wrap(case: str, base, states: dict[str, dict[str, torch.Tensor]]):
    """(wrapped model, function that gives the base model back); adapter values shared per kind via ``states``."""
    lib_name, kind = case.split("-")
    if lib_name == "peft":
        import peft as lib
    else:
        import lorakit as lib
    model = lib.get_peft_model(base, lora_config(lib, dora=kind == "dora"))
    model.train()
    states[kind] = seed_adapters(model, states.get(kind))
    return model, lambda: model.base_model.unload()


def bench(args: argparse.Namespace) -> list[Result]:
    profile = dict(PROFILES[args.profile])
    for key in ("batch", "seq", "layers"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    device = args.device or ("cuda" if args.profile == "gpu" else "cpu")
    dtype = DTYPES[args.dtype or profile["dtype"]]
    base = build_model(profile, device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in base.parameters()}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, profile["vocab"], (profile["batch"], profile["seq"]), generator=g).to(device)
    print(f"profile={args.profile} {profile} device={device} dtype={dtype} torch={torch.__version__}")
    results, states = [], {}
    for case in args.cases.split(","):
        case, _, setting = case.partition(":")
        if case not in CASES:
            raise SystemExit(f"Unknown case {case!r}; cases are {', '.join(CASES)}.")
        apply_setting(setting)
        case_label = f"{case}:{setting}" if setting else case
        graph = setting == "graph"
        if graph and device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()  # the capture allocates the step's activations: count it
        if case == "floor":
            base.train()
            model, restore = base, (lambda m=base: m)
            step = make_floor_step(base, ids, graph)
        else:
            model, restore = wrap(case, base, states)
            step = make_train_step(model, ids, graph, autocast=setting == "autocast")
        ms, ms_min, peak, saved, loss0 = run_case(step, device, args.steps, args.warmup, params, not graph)
        if graph and device.startswith("cuda"):
            saved = float("nan")  # a replay runs no autograd hooks: not measured
        results.append(Result(case_label, ms, ms_min, peak, saved, loss0))
        if (args.trace or args.phases) and case.startswith("lorakit"):
            trace_case(case_label, model, ids, device, tables=args.trace)
        base = restore()
        del model, step
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(
            f"  {case_label:14s} {ms:9.1f} ms (min {ms_min:.1f})  peak {fmt(peak)} GiB  saved {saved:7.3f} GiB  "
            f"loss0 {loss0:.6f}",
            flush=True,
        )
    return results


def trace_case(case: str, model, ids: torch.Tensor, device: str, tables: bool) -> None:
    """Host issue and wall time of forward and backward; with ``tables`` the top ops by device and host time."""
    from cases.training import _phases, _trace

    phases = _phases(lambda: model(input_ids=ids, labels=ids).loss, torch.device(device))
    print(f"  {case} phases: {phases}", flush=True)
    if tables:
        _trace(model, ids, print)


def fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def report(results: list[Result]) -> None:
    floor = next((r for r in results if r.case == "floor"), None)
    print("\n| case | ms/step (median) | min | x floor | peak GiB | saved for backward GiB | step-0 loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r.ms / floor.ms:.2f}x" if floor else "-"
        print(
            f"| {r.case} | {r.ms:.1f} | {r.ms_min:.1f} | {ratio} | {fmt(r.peak_gib).strip()} | {r.saved_gib:.3f} "
            f"| {r.loss:.6f} |"
        )
    by_case = {r.case: r for r in results}
    for kind in ("lora", "dora"):
        ours, ref = by_case.get(f"lorakit-{kind}"), by_case.get(f"peft-{kind}")
        if ours and ref:
            print(
                f"{kind}: lorakit / peft time {ours.ms / ref.ms:.2f}, "
                f"saved {ours.saved_gib / max(ref.saved_gib, 1e-9):.2f}, "
                f"step-0 loss difference {abs(ours.loss - ref.loss):.2e}"
            )


def bench_layer(args: argparse.Namespace) -> None:
    """One d x d Linear, forward + backward to x and the adapter; cases interleaved, min and median per case."""
    import peft

    import lorakit

    device = args.device or "cpu"
    dtype = DTYPES[args.dtype or "fp32"]
    torch.manual_seed(0)
    base = torch.nn.Linear(args.dim, args.dim, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    models: dict[str, torch.nn.Module] = {"floor": torch.nn.Sequential(base)}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for case in CASES[1:]:
        lib_name, kind = case.split("-")
        lib = peft if lib_name == "peft" else lorakit
        layer = torch.nn.Linear(args.dim, args.dim, bias=False).to(device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        cfg = lib.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["0"], use_dora=kind == "dora")
        models[case] = lib.get_peft_model(torch.nn.Sequential(layer), cfg)
        models[case].train()
        states[kind] = seed_adapters(models[case], states.get(kind))

    def step(model: torch.nn.Module) -> None:
        inputs = x.detach().requires_grad_(True)
        model(inputs).float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    times: dict[str, list[float]] = {case: [] for case in models}
    for round_ in range(args.warmup + args.steps):
        for case, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model)
            sync(device)
            if round_ >= args.warmup:
                times[case].append((time.perf_counter() - start) * 1e3)
    ops = {case: count_ops(lambda model=model: step(model)) for case, model in models.items()}
    print(f"layer d={args.dim} r={args.rank} T={args.tokens} dtype={dtype} device={device} torch={torch.__version__}")
    print("| case | ms (median) | min | x floor (min) | aten ops fwd+bwd |")
    print("| --- | --- | --- | --- | --- |")
    floor = min(times["floor"])
    for case, values in times.items():
        line = f"| {case} | {statistics.median(values):.2f} | {min(values):.2f} | {min(values) / floor:.2f}x"
        print(f"{line} | {ops[case]} |")


def count_ops(fn: Callable[[], None]) -> int:
    """Aten ops dispatched by one (warm) call of ``fn``: each one costs host time on a GPU step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the gpu profile)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of {', '.join(CASES)}; CASE:MODE|chunks=C|shared=0|graph|autocast",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--trace", action="store_true", help="trace the lorakit cases: phases and top ops")
    parser.add_argument("--phases", action="store_true", help="host and wall time of each lorakit case's phases")
    parser.add_argument("--layer", action="store_true", help="single-Linear micro-benchmark instead of the model")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.layer:
        bench_layer(args)
    else:
        report(bench(args))


if __name__ == "__main__":
    main()
