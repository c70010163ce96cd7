"""Trainable tokens and target_parameters (MoE experts), lorakit vs peft: forward + backward of one module.

Cases run interleaved round by round (load from other processes hits all alike); each library wraps its own copy of
the same seeded module, and both get the same adapter values, so the outputs are compared too.

- tokens: an nn.Embedding (vocab V, dim d) with ``trainable_token_indices`` (n ids) and a small LoRA'd head
  (d -> 8), input (B, T) ids.
  PEFT writes the rows into a full copy of the embedding every forward; lorakit overwrites the looked-up positions.
- experts: transformers' Qwen3-MoE sparse block (router + experts stored (E, out, in)), ``target_parameters`` on
  gate_up_proj and down_proj, input (B*T, d) hidden states.

    python benchmarks/bench_tokens_experts.py                   # CPU profile (~30 s)
    python benchmarks/bench_tokens_experts.py --profile gpu     # 128k vocab x 4096; 64 experts of a 30B-A3B shape
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

PROFILES = {
    "cpu": dict(vocab=32000, dim=512, n_ids=64, batch=4, seq=256, experts=8, hidden=256, inter=128, top_k=2),
    "gpu": dict(vocab=128256, dim=4096, n_ids=256, batch=8, seq=2048, experts=64, hidden=2048, inter=768, top_k=8),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class EmbeddingModel(nn.Module):
    """An embedding and a small head (LoRA needs a target module; the head is what LoRA adapts)."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_tokens(ids))


class MoEModel(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(
            hidden_size=p["hidden"],
            moe_intermediate_size=p["inter"],
            num_experts=p["experts"],
            num_experts_per_tok=p["top_k"],
        )
        self.mlp = Qwen3MoeSparseMoeBlock(config)
        with torch.no_grad():
            for param in self.mlp.parameters():
                param.normal_(0, 0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.mlp(hidden.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def _wrap(lib, build: Callable[[], nn.Module], kwargs: dict, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build().to(device=device, dtype=dtype)
    wrapped = lib.get_peft_model(model, lib.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(1)
    state = lib.get_peft_model_state_dict(wrapped)
    values = {k: (torch.randn(state[k].shape, generator=g) * 0.02).to(state[k]) for k in sorted(state)}
    lib.set_peft_model_state_dict(wrapped, values)
    return wrapped.train()


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.float().square().mean().backward()
    return out.detach()


def _time(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_group(name: str, models: dict[str, nn.Module], x: torch.Tensor, device: str, rounds: int) -> None:
    outs = {case: _step(model, x) for case, model in models.items()}  # warm-up
    ref, ours = outs.values()
    print(f"{name}: max |lorakit - peft| = {(ref.float() - ours.float()).abs().max().item():.3g}")
    times: dict[str, list[float]] = {case: [] for case in models}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for case, model in models.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[case].append(_time(lambda m=model: _step(m, x), device))
            if device == "cuda":
                peaks[case] = torch.cuda.max_memory_allocated() / 2**30
    for case, values in times.items():
        peak = f", peak {peaks[case]:.2f} GiB" if case in peaks else ""
        print(f"  {case:8s} {statistics.median(values):8.2f} ms (min {min(values):.2f}){peak}")


def main() -> None:
    import peft

    import lorakit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on gpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", choices=["tokens", "experts"], default=None)
    args = parser.parse_args()
    p = PROFILES[args.profile]
    device = "cuda" if args.profile == "gpu" else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    libs = {"peft": peft, "lorakit": lorakit}
    g = torch.Generator().manual_seed(2)
    print(f"profile {args.profile}: {p}, {dtype}, torch {torch.__version__}, peft {peft.__version__}")
    if args.only in (None, "tokens"):
        ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=g).to(device)
        tokens = dict(
            target_modules=["head"], trainable_token_indices=list(range(0, p["vocab"], p["vocab"] // p["n_ids"]))
        )
        tokens["trainable_token_indices"] = tokens["trainable_token_indices"][: p["n_ids"]]
        ids[:, ::7] = ids[:, ::7] % p["n_ids"] * (p["vocab"] // p["n_ids"])  # every 7th position a trainable id
        models = {
            name: _wrap(lib, lambda: EmbeddingModel(p["vocab"], p["dim"]), tokens, device, dtype)
            for name, lib in libs.items()
        }
        run_group("tokens", models, ids, device, args.rounds)
        del models
    if args.only in (None, "experts"):
        hidden = (torch.randn(p["batch"] * p["seq"], p["hidden"], generator=g) * 0.5).to(device, dtype)
        experts = dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        experts["r"] = 16
        models = {name: _wrap(lib, lambda: MoEModel(p), experts, device, dtype) for name, lib in libs.items()}
        run_group("experts", models, hidden, device, args.rounds)


if __name__ == "__main__":
    main()
