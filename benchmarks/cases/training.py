"""Training cases: the frozen floor (forward + backward to the inputs), a LoRA AdamW step, the same with dropout 0.1,
each library on the same base model, adapter weights and tokens; median time and peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .common import (
    Row,
    adapter_state,
    host_issue_ms,
    peak_gib,
    reset_peak,
    synchronize,
    time_ms,
    unwrap,
    wrap_lorakit,
    wrap_peft,
)


def _tokens(profile: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, profile["vocab"], (profile["train_batch"], profile["train_seq"]), generator=gen)
    return ids.to(device)


def _floor(base, ids: torch.Tensor, profile: dict, device: torch.device) -> tuple[float, float | None]:
    embed = base.get_input_embeddings()

    def step():
        inputs = embed(ids).detach().requires_grad_(True)
        base(inputs_embeds=inputs, labels=ids).loss.backward()

    base.train()
    reset_peak(device)
    ms = time_ms(step, device, profile["steps"], profile["warmup"])
    peak = peak_gib(device)
    if profile.get("trace"):
        profile["log"](
            "floor phases: "
            + _phases(lambda: base(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss, device)
        )
    profile.setdefault("host_ms", {})["floor"] = host_issue_ms(step, device, profile["steps"])
    return ms, peak


def _lora_step(
    model, ids: torch.Tensor, profile: dict, device: torch.device, label: str
) -> tuple[float, float | None, float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    step()  # optimizer state exists before the peak is reset: both libraries are measured alike
    reset_peak(device)
    ms = time_ms(step, device, profile["steps"], profile["warmup"])
    peak = peak_gib(device)
    profile.setdefault("host_ms", {})[label] = host_issue_ms(step, device, profile["steps"])
    return ms, peak, losses[0].item()


def _graph_ms(make_step: Callable[[], Callable[[], object]], profile: dict, device: torch.device, log, label: str):
    """(median ms, peak GiB) of a step replayed as a CUDA graph (``CudaGraphStep``), or (None, None) with the reason
    logged when the capture fails. The peak counts the capture, where the graph's activations are allocated."""
    reset_peak(device)
    try:
        step = make_step()
    except RuntimeError as error:
        log(f"{label}: CUDA-graph capture failed: {error}")
        return None, None
    return time_ms(step, device, profile["steps"], profile["warmup"]), peak_gib(device)


def _graphed_rows(base, ids: torch.Tensor, profile: dict, device: torch.device, log) -> tuple[list[Row], object]:
    """The floor and each library's LoRA AdamW step with forward + backward replayed as one CUDA graph (AdamW
    eager): device time alone, whatever the host CPU."""
    from lorakit.integrations.causal_sdpa import use_causal_sdpa
    from lorakit.integrations.cuda_graphs import CudaGraphStep

    embed = base.get_input_embeddings()
    base.train()
    attention = use_causal_sdpa(base)  # the mask stays is_causal inside the capture (integrations/causal_sdpa.py)

    def floor_step():
        replay = CudaGraphStep(base, {"inputs_embeds": embed(ids).detach().requires_grad_(True), "labels": ids})
        return lambda: replay()

    def train_step(model):
        def make():
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            replay = CudaGraphStep(model, {"input_ids": ids, "labels": ids})

            def step():
                replay()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # optimizer state exists before timing, as in the eager rows
            return step

        return make

    floor_ms, floor_gib = _graph_ms(floor_step, profile, device, log, "floor")
    peft_model = wrap_peft(base, 1, 0.0)
    state = adapter_state(peft_model)
    peft_ms, peft_gib = _graph_ms(train_step(peft_model.train()), profile, device, log, "peft")
    base = unwrap(peft_model)
    lk_model = wrap_lorakit(base, state, 1, 0.0)
    lk_ms, lk_gib = _graph_ms(train_step(lk_model.train()), profile, device, log, "lorakit")
    base = unwrap(lk_model)
    base.set_attn_implementation(attention)
    log(f"CUDA graph: floor {floor_ms} ms / peft {peft_ms} ms / lorakit {lk_ms} ms")
    notes = f"peak floor {_mem(floor_gib, None)}, peft {_mem(peft_gib, floor_gib)}, lorakit {_mem(lk_gib, floor_gib)}"
    rows = [
        Row("training", "frozen floor, CUDA graph", floor_ms, None, None, _mem(floor_gib, None)),
        Row("training", "LoRA step (AdamW), fwd + bwd as a CUDA graph", floor_ms, peft_ms, lk_ms, notes),
    ]
    return rows, base


def _trace(model, ids: torch.Tensor, log) -> None:
    """Log the top kernels (by device time) of one training step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize() if ids.is_cuda else None
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    for sort in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = events.table(sort_by=sort, row_limit=25)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    log("trace of one lorakit step (fwd + bwd):\n" + table)
    log("by host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=15))
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e3
    log(f"device kernels in one fwd + bwd: {len(kernels)}, summed kernel time {busy:.1f} ms")


def _phases(forward: Callable[[], torch.Tensor], device: torch.device, steps: int = 5) -> str:
    """Median host issue and wall times (ms) of the forward and of the backward, each started on an empty queue:
    host ~ wall means the phase waits for Python (host-bound); well below, the device is the limit."""
    times: dict[str, list[float]] = {"forward host": [], "forward wall": [], "backward host": [], "backward wall": []}
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss = forward()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        loss.backward()
        back_issued = time.perf_counter()
        synchronize(device)
        times["forward host"].append(issued - start)
        times["forward wall"].append(done - start)
        times["backward host"].append(back_issued - done)
        times["backward wall"].append(time.perf_counter() - done)
    return ", ".join(f"{name} {statistics.median(v) * 1e3:.1f} ms" for name, v in times.items())


def _mem(gib: float | None, floor: float | None) -> str:
    return "" if gib is None else f"{gib:.1f} GiB ({gib / floor:.2f}x floor)" if floor else f"{gib:.1f} GiB"


def run(base, profile: dict, device: torch.device, log) -> tuple[list[Row], object]:
    profile["log"] = log
    ids = _tokens(profile, device)
    floor_ms, floor_gib = _floor(base, ids, profile, device)
    log(f"floor: {floor_ms:.1f} ms, peak {floor_gib}")
    rows = [Row("training", "frozen floor: fwd + bwd to inputs", floor_ms, None, None, _mem(floor_gib, None))]
    for dropout in (0.0, 0.1):
        peft_model = wrap_peft(base, 1, dropout)
        state = adapter_state(peft_model)
        peft_ms, peft_gib, peft_loss = _lora_step(peft_model, ids, profile, device, f"peft p={dropout}")
        base = unwrap(peft_model)
        lk_model = wrap_lorakit(base, state, 1, dropout)
        lk_ms, lk_gib, lk_loss = _lora_step(lk_model, ids, profile, device, f"lorakit p={dropout}")
        if profile.get("trace"):
            _trace(lk_model, ids, log)
            log("lorakit phases: " + _phases(lambda m=lk_model: m(input_ids=ids, labels=ids).loss, device))
        base = unwrap(lk_model)
        log(f"dropout {dropout}: peft {peft_ms:.1f} ms / lorakit {lk_ms:.1f} ms; losses {peft_loss:.5f} {lk_loss:.5f}")
        case = "LoRA step (AdamW)" + (f", dropout {dropout}" if dropout else "")
        notes = []
        if peft_gib is not None:
            notes.append(f"peak peft {_mem(peft_gib, floor_gib)}, lorakit {_mem(lk_gib, floor_gib)}")
        if dropout == 0.0:
            notes.append(f"step-0 loss peft {peft_loss:.4f} / lorakit {lk_loss:.4f}")
        hosts = profile.get("host_ms", {})
        notes.append(
            "host issue ms floor {:.1f} / peft {:.1f} / lorakit {:.1f}".format(
                hosts["floor"], hosts[f"peft p={dropout}"], hosts[f"lorakit p={dropout}"]
            )
        )
        rows.append(Row("training", case, floor_ms, peft_ms, lk_ms, "; ".join(notes)))
    if device.type == "cuda":  # elsewhere CudaGraphStep runs eagerly: nothing new to measure
        graphed, base = _graphed_rows(base, ids, profile, device, log)
        rows += graphed
    return rows, base
