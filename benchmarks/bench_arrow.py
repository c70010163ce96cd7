"""Arrow routing: forward of one routed Linear, lorakit vs peft, cases interleaved round by round.

Each case is a d x d nn.Linear with E experts of rank r and an active ``arrow_router`` (top_k=3), built the same way
in both libraries with the same seeded expert weights. peft's power iteration is run to convergence here (3000
iterations instead of 15) so that both libraries route with the same prototypes and the outputs can be compared;
that changes only peft's one-off prototype cost, not the timed forward.

Reported per case: median ms per forward of the base Linear, peft and lorakit, the routing overhead over the base,
the largest output difference and the tokens that differ (a token whose top_k-th and next score tie to float
precision can pick another expert in either library).

    python benchmarks/bench_arrow.py                             # CPU, 1 thread, ~30 s
    python benchmarks/bench_arrow.py --device cuda --dim 4096 --tokens 8192 --experts 8,32 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn

from cases.common import OneLinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(lib, dim: int, experts: int, rank: int, device: str, dtype: torch.dtype) -> nn.Module:
    """``lib`` (peft or lorakit) model: experts task_0..task_{E-1} plus the active arrow_router."""
    torch.manual_seed(0)
    base = OneLinear(dim).to(device, dtype)

    def config(**kw):
        return lib.LoraConfig(r=rank, target_modules=["lin"], init_lora_weights=False, **kw)

    model = lib.get_peft_model(base, config(), adapter_name="task_0")
    for i in range(1, experts):
        model.add_adapter(f"task_{i}", config())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    arrow = lib.ArrowConfig(top_k=3)
    arrow.task_adapter_names, arrow.gks_adapter_names = [f"task_{i}" for i in range(experts)], []
    model.add_adapter("arrow_router", config(arrow_config=arrow))
    model.set_adapter("arrow_router")
    return model.eval()


def converge_peft_prototypes() -> None:
    from peft.tuners.lora import arrow as peft_arrow

    original = peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA

    def converged(self, lora_a, lora_b, iters=15, eps=1e-8):
        return original(self, lora_a, lora_b, iters=3000, eps=eps)

    peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA = converged


def timed(model: nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(args: argparse.Namespace, experts: int) -> None:
    import peft

    import lorakit

    dtype = DTYPES[args.dtype]
    x = torch.randn(args.tokens, args.dim, device=args.device, dtype=dtype)  # (t, d)
    models = {
        "base": OneLinear(args.dim).to(args.device, dtype),
        "peft": build(peft, args.dim, experts, args.rank, args.device, dtype),
        "lorakit": build(lorakit, args.dim, experts, args.rank, args.device, dtype),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        outputs = {name: model(x).float() for name, model in models.items()}  # also builds the prototypes
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(timed(model, x))
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    diff = (outputs["peft"] - outputs["lorakit"]).abs()
    off = int((diff.amax(-1) > 1e-3 * outputs["peft"].abs().amax()).sum())
    print(
        f"d={args.dim} E={experts} r={args.rank} t={args.tokens} {args.dtype} {args.device}: base {ms['base']:.2f} ms, "
        f"peft {ms['peft']:.2f} ms, lorakit {ms['lorakit']:.2f} ms; routing overhead peft {ms['peft'] - ms['base']:.2f}"
        f" ms, lorakit {ms['lorakit'] - ms['base']:.2f} ms; max |diff| {diff.max().item():.1e}, tokens that differ: "
        f"{off} of {args.tokens}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts", default="8,32", help="comma-separated expert counts, one case each")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    converge_peft_prototypes()
    for experts in (int(e) for e in args.experts.split(",")):
        run_case(args, experts)


if __name__ == "__main__":
    main()
