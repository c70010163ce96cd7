"""Shared pieces of the benchmark cases: profiles, the model, timing, peak memory, identical adapters in both
libraries, and the result rows."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

PROFILES = {
    # the performance issue's H200 setting: a 1.1B Llama shape built from a config, bf16, r=16 all-linear
    "gpu": dict(
        hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8, vocab=32000, dtype=torch.bfloat16,
        train_batch=4, train_seq=2048, prefill_batch=32, prefill_seq=512, mixed=(4, 16, 32),
        decode_batch=32, decode_prompt=128, decode_tokens=16, adapters=32,
        layer_d=4096, layer_ranks=(8, 16, 64), layer_tokens=(1024, 8192), steps=10, warmup=3,
    ),
    # sized for 2 CPU cores: the whole profile runs in a few minutes
    "cpu": dict(
        hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4, vocab=2048, dtype=torch.float32,
        train_batch=2, train_seq=128, prefill_batch=16, prefill_seq=64, mixed=(4, 16),
        decode_batch=16, decode_prompt=32, decode_tokens=8, adapters=16,
        layer_d=512, layer_ranks=(8, 16, 64), layer_tokens=(256, 1024), steps=5, warmup=2,
    ),
    # a seconds-long run of every code path, for checking the harness itself
    "smoke": dict(
        hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256, dtype=torch.float32,
        train_batch=2, train_seq=16, prefill_batch=8, prefill_seq=8, mixed=(4, 8),
        decode_batch=8, decode_prompt=4, decode_tokens=3, adapters=8,
        layer_d=64, layer_ranks=(8,), layer_tokens=(32,), steps=2, warmup=1,
    ),
}  # fmt: skip
RANK = 16


@dataclass
class Row:
    """One benchmark line: the case, the baseline it is divided by, and each library's time."""

    group: str
    case: str
    base_ms: float | None
    peft_ms: float | None
    lorakit_ms: float | None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def ratios(self) -> tuple[str, str, str]:
        def ratio(ms):
            return f"{ms / self.base_ms:.2f}x" if ms and self.base_ms else "-"

        speedup = f"{self.peft_ms / self.lorakit_ms:.2f}x" if self.peft_ms and self.lorakit_ms else "-"
        return ratio(self.peft_ms), ratio(self.lorakit_ms), speedup


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Wall time of ``fn`` in ms (synchronised per call, so device work is included): the median on CUDA, the
    minimum on CPU (a shared 2-core host: the minimum is the least disturbed run)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if device.type == "cuda" else min(times)


def host_issue_ms(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    """Median host time of ``fn`` until it returns, without waiting for the device (synchronised before each call,
    so the queue starts empty). Close to the wall time: the step is host-bound; far below it: device-bound."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class OneLinear(nn.Module):
    """A single d x d Linear as a model (``lin``): the smallest thing a LoRA layer wraps, for micro-benchmarks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def llama_model(shape: dict, device: torch.device | str, dtype: torch.dtype, max_positions: int = 4096, **kwargs):
    """A LlamaForCausalLM built from ``shape`` (hidden, layers, intermediate, heads, kv_heads, vocab), seed 0,
    created directly on ``device`` and cast to ``dtype``. Shared by every benchmark script so they build one model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **kwargs,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def build_llama(profile: dict, device: torch.device):
    model = llama_model(profile, device, profile["dtype"])
    model.requires_grad_(False)
    return model.eval()


def lora_kwargs(dropout: float = 0.0) -> dict:
    return dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)


def wrap_peft(base, n_adapters: int = 1, dropout: float = 0.0):
    """peft's model with adapters a0..a{n-1} (random A and B, seeded), a0 active."""
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs(dropout)), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", peft.LoraConfig(**lora_kwargs(dropout)))
    return model


def wrap_lorakit(base, state: dict[str, torch.Tensor], n_adapters: int = 1, dropout: float = 0.0):
    """lorakit's model with adapters a0..a{n-1} holding ``state`` (peft's adapter weights, by the shared names)."""
    import lorakit

    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**lora_kwargs(dropout)), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", lorakit.LoraConfig(**lora_kwargs(dropout)))
    load_adapter_state(model, state)
    return model


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter weights (to move them between libraries)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in adapter_params(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    params = adapter_params(model)
    differ = sorted(set(params) ^ set(state))
    if differ:
        raise RuntimeError(f"adapter parameter names differ between peft and lorakit, e.g. {differ[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def unwrap(model):
    """The base model back, without adapters (both libraries' ``unload``), frozen."""
    base = model.unload()
    base.requires_grad_(False)
    release(model)
    return base


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def release(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
