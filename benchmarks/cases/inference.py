"""Inference cases on one model with many adapters: prefill (base, one adapter, mixed batches of k adapters) and
decode steps with every row on its own adapter, through each library's public API (``adapter_names=``).

Decode step time = (generate(1 + n tokens) - generate(1 token)) / n, so prefill is excluded and both libraries
route a whole generation as users do. lorakit's outputs are checked against peft's (relative error in the notes).
"""

from __future__ import annotations

import contextlib

import torch

from .common import Row, adapter_state, rel_err, time_ms, unwrap, wrap_lorakit, wrap_peft


def _prefill_ids(profile: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    shape = (profile["prefill_batch"], profile["prefill_seq"])
    return torch.randint(0, profile["vocab"], shape, generator=gen).to(device)


def _decode_ids(profile: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    shape = (profile["decode_batch"], profile["decode_prompt"])
    return torch.randint(0, profile["vocab"], shape, generator=gen).to(device)


def _names(rows: int, k: int) -> list[str]:
    return [f"a{i % k}" for i in range(rows)]


def _prefill_cases(model, profile: dict, device: torch.device, lib: str) -> tuple[dict, dict]:
    """{case: ms}, {case: last-token logits} for one 1-adapter run and each mixed size."""
    ids = _prefill_ids(profile, device)
    times, outputs = {}, {}
    steps, warmup = max(3, profile["steps"] // 2), 2
    with torch.inference_mode():
        if lib != "base":
            model.set_adapter("a0")
        times["prefill 1"] = time_ms(lambda: model(input_ids=ids), device, steps, warmup)
        outputs["prefill 1"] = model(input_ids=ids).logits[:, -1].float().cpu()
        if lib == "base":
            return times, outputs
        for k in profile["mixed"]:
            names = _names(ids.shape[0], k)
            times[f"mixed {k}"] = time_ms(lambda n=names: model(input_ids=ids, adapter_names=n), device, steps, warmup)
            outputs[f"mixed {k}"] = model(input_ids=ids, adapter_names=names).logits[:, -1].float().cpu()
    return times, outputs


def _decode_ms(model, profile: dict, device: torch.device, names: list[str] | None, reps: int = 2) -> float:
    ids = _decode_ids(profile, device)
    extra = {} if names is None else {"adapter_names": names}
    n = profile["decode_tokens"]

    def generate(tokens: int):
        return model.generate(
            input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, **extra
        )

    with torch.inference_mode():
        one = time_ms(lambda: generate(1), device, 3, 1)
        full = time_ms(lambda: generate(1 + n), device, reps, 1 if reps > 1 else 0)
    return (full - one) / n


def _trace_mixed(model, profile: dict, device: torch.device, log) -> None:
    """Log where one mixed-batch prefill (every adapter) spends host and device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = _prefill_ids(profile, device)
    names = _names(ids.shape[0], profile["adapters"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), torch_profile(activities=activities) as prof:
        model(input_ids=ids, adapter_names=names)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    log("trace of one mixed prefill, by host time:\n" + events.table(sort_by="cpu_time_total", row_limit=18))
    with contextlib.suppress(Exception):
        log("by device time:\n" + events.table(sort_by="self_device_time_total", row_limit=12))


@contextlib.contextmanager
def _cuda_backend(name: str):
    import lorakit.kernels.mixed_dispatch as dispatch

    previous = dispatch.CUDA_BACKEND
    dispatch.CUDA_BACKEND = name
    try:
        yield
    finally:
        dispatch.CUDA_BACKEND = previous


def _lorakit_runs(base, state: dict, profile: dict, device: torch.device, log) -> tuple[dict, dict, object]:
    model = wrap_lorakit(base, state, profile["adapters"]).eval()
    backends = profile.get("mixed_backends", ["auto"]) if device.type == "cuda" else ["auto"]
    times, outputs = {}, {}
    names = _names(profile["decode_batch"], profile["adapters"])
    for i, backend in enumerate(backends):
        with _cuda_backend(backend):
            t, o = _prefill_cases(model, profile, device, "lorakit")
            t["decode"] = _decode_ms(model, profile, device, names, reps=3)
            if profile.get("trace") and i == 0:
                _trace_mixed(model, profile, device, log)
        suffix = "" if i == 0 else f" [{backend}]"
        times.update({k + suffix: v for k, v in t.items() if not (suffix and k == "prefill 1")})
        outputs.update({k + suffix: v for k, v in o.items() if not (suffix and k == "prefill 1")})
        log(f"lorakit {backend}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items()))
    return times, outputs, unwrap(model)


def run(base, profile: dict, device: torch.device, log) -> tuple[list[Row], object]:
    base_t, _ = _prefill_cases(base, profile, device, "base")
    base_t["decode"] = _decode_ms(base, profile, device, None)
    log(f"base: prefill {base_t['prefill 1']:.1f} ms, decode step {base_t['decode']:.2f} ms")
    peft_model = wrap_peft(base, profile["adapters"]).eval()
    state = adapter_state(peft_model)
    peft_t, peft_o = _prefill_cases(peft_model, profile, device, "peft")
    names = _names(profile["decode_batch"], profile["adapters"])
    peft_t["decode"] = _decode_ms(peft_model, profile, device, names, reps=1)  # ~50x slower: one run suffices
    log("peft: " + ", ".join(f"{k} {v:.1f} ms" for k, v in peft_t.items()))
    base = unwrap(peft_model)
    lk_t, lk_o, base = _lorakit_runs(base, state, profile, device, log)
    b, t = profile["prefill_batch"], profile["prefill_seq"]
    rows = [Row("inference", f"prefill B{b} x T{t}, base model", base_t["prefill 1"], None, None)]
    for key, lk_ms in lk_t.items():
        plain = key.split(" [")[0]
        if plain == "decode":
            case = f"decode step, B{profile['decode_batch']}, {profile['adapters']} mixed adapters"
            rows.append(Row("inference", case + key[len(plain) :], base_t["decode"], peft_t["decode"], lk_ms))
            continue
        label = "prefill, 1 adapter" if plain == "prefill 1" else f"prefill, mixed batch of {plain.split()[1]} adapters"
        err = rel_err(lk_o[key], peft_o[plain])
        rows.append(
            Row("inference", label + key[len(plain) :], base_t["prefill 1"], peft_t[plain], lk_ms, f"rel err {err:.1e}")
        )
    return rows, base
