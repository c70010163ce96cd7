"""Host (Python) overhead per call: frozen base vs lorakit vs peft on tiny shapes, where compute is negligible.

On a GPU a LoRA step waits for Python when host time exceeds device time; on CPU with tiny tensors what remains of
each call is that host time. Cases (LoRA r=4 on all linear layers, ``init_lora_weights=False``, float32):

* ``layer fwd`` / ``layer fwd+bwd``: one d=64 LoRA Linear called directly (no model around it);
* ``model fwd``: a 16-layer Llama built from ``LlamaConfig`` (hidden 64), B1 x T8, ``no_grad``, eval;
* ``model fwd+bwd``: same, train mode, loss.backward() into the adapters (frozen: into the input embeddings);
* ``mixed fwd``: B32 x T8 with 32 adapters, one per row (``adapter_names``); frozen: the base forward;
* ``decode step``: B32 rows, 32 adapters, (generate(1 + n) - generate(1)) / n tokens through ``generate``.

Cases are interleaved round by round (load from other processes hits all of them alike); each round times
``--calls`` calls; the minimum over rounds is printed (and the median, for the spread). Single thread.
``--clock thread`` counts this thread's CPU time instead of wall time: on a shared machine, time spent waiting for
a core is then not counted (host overhead is CPU time by nature).

    python benchmarks/bench_host_overhead.py                 # about a minute on 2 CPU cores
    python benchmarks/bench_host_overhead.py --rounds 5 --calls 50 --cases layer,model
    python benchmarks/bench_host_overhead.py --profile model-fwd+bwd   # cProfile of lorakit's calls, top 25
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from cases.common import OneLinear

RANK = 4
N_ADAPTERS = 32
USE_DORA = False  # --dora: DoRA adapters instead of plain LoRA
DEVICE = torch.device("cpu")  # --device


def _lora_kwargs(targets) -> dict:
    return dict(
        r=RANK,
        lora_alpha=2 * RANK,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights=False,
        use_dora=USE_DORA,
    )


def _wrap(lib: str, base: nn.Module, targets, n_adapters: int = 1):
    mod = __import__(lib)
    torch.manual_seed(1)
    model = mod.get_peft_model(copy.deepcopy(base), mod.LoraConfig(**_lora_kwargs(targets)), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", mod.LoraConfig(**_lora_kwargs(targets)))
    return model


def _llama(hidden: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE)
    model.requires_grad_(False)
    return model.eval()


def _layer_cases(d: int) -> dict[str, dict[str, Callable[[], object]]]:
    torch.manual_seed(0)
    base = OneLinear(d).to(DEVICE).requires_grad_(False)
    layers = {"frozen": base.lin}
    for lib in ("lorakit", "peft"):
        layers[lib] = _wrap(lib, base, ["lin"]).base_model.model.lin
    x = torch.randn(8, d, device=DEVICE)
    xg = x.clone().requires_grad_()

    def fwd(layer):
        def call():
            with torch.no_grad():
                return layer(x)

        return call

    def fwd_bwd(layer, inp):
        return lambda: layer(inp).sum().backward()

    return {
        "layer fwd": {k: fwd(v) for k, v in layers.items()},
        "layer fwd+bwd": {
            "frozen": fwd_bwd(layers["frozen"], xg),
            "lorakit": fwd_bwd(layers["lorakit"], x),
            "peft": fwd_bwd(layers["peft"], x),
        },
    }


def _model_cases(hidden: int, layers: int) -> dict[str, dict[str, Callable[[], object]]]:
    base = _llama(hidden, layers)
    models = {"frozen": base}
    for lib in ("lorakit", "peft"):
        models[lib] = _wrap(lib, base, "all-linear")
    train = {k: copy.deepcopy(m).train() for k, m in models.items()}  # separate copies: no mode switch per call
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    embeds = base.get_input_embeddings()(ids).detach()
    embeds_g = embeds.clone().requires_grad_()

    def fwd(model):
        def call():
            with torch.no_grad():
                return model(input_ids=ids)

        return call

    def fwd_bwd(model, inp):
        return lambda: model(inputs_embeds=inp).logits.sum().backward()

    return {
        "model fwd": {k: fwd(m.eval()) for k, m in models.items()},
        "model fwd+bwd": {k: fwd_bwd(m, embeds_g if k == "frozen" else embeds) for k, m in train.items()},
    }


def _mixed_cases(hidden: int, layers: int, decode_tokens: int) -> dict[str, dict[str, Callable[[], object]]]:
    base = _llama(hidden, layers)
    models = {
        "frozen": base,
        "lorakit": _wrap("lorakit", base, "all-linear", N_ADAPTERS).eval(),
        "peft": _wrap("peft", base, "all-linear", N_ADAPTERS).eval(),
    }
    ids = torch.randint(0, 256, (N_ADAPTERS, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    names = [f"a{i}" for i in range(N_ADAPTERS)]

    def kwargs(lib: str) -> dict:
        return {} if lib == "frozen" else {"adapter_names": names}

    def fwd(lib, model):
        def call():
            with torch.no_grad():
                return model(input_ids=ids, **kwargs(lib))

        return call

    def generate(lib, model, tokens):
        def call():
            with torch.no_grad():
                return model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                    **kwargs(lib),
                )

        return call

    return {
        "mixed fwd": {k: fwd(k, m) for k, m in models.items()},
        "_gen1": {k: generate(k, m, 1) for k, m in models.items()},
        "_genN": {k: generate(k, m, 1 + decode_tokens) for k, m in models.items()},
    }


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter


def _time_round(fn: Callable[[], object], calls: int) -> float:
    start = _clock()
    for _ in range(calls):
        fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return (_clock() - start) / calls * 1e6


def _run(cases: dict[str, dict[str, Callable[[], object]]], rounds: int, calls: int) -> dict[str, dict[str, list]]:
    times: dict[str, dict[str, list]] = {c: {lib: [] for lib in libs} for c, libs in cases.items()}
    for libs in cases.values():  # warm-up: caches, lazy imports, first-call paths
        for fn in libs.values():
            _time_round(fn, 2)
    for _ in range(rounds):
        for c, libs in cases.items():
            n = max(1, calls // 20) if c.startswith("_gen") else calls // 4 if c.startswith("mixed") else calls
            for lib, fn in libs.items():
                times[c][lib].append(_time_round(fn, n))
    return times


def _decode_rows(times: dict, decode_tokens: int) -> None:
    if "_genN" not in times:
        return
    step = {
        lib: [(n - one) / decode_tokens for n, one in zip(times["_genN"][lib], times["_gen1"][lib], strict=True)]
        for lib in times["_genN"]
    }
    times["decode step"] = step
    del times["_genN"], times["_gen1"]


def _print(times: dict) -> None:
    print("| case | frozen us | lorakit us | peft us | lorakit / frozen | peft / frozen | peft / lorakit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, libs in times.items():
        best = {lib: min(v) for lib, v in libs.items()}
        med = {lib: statistics.median(v) for lib, v in libs.items()}
        f, lk, pf = best["frozen"], best["lorakit"], best["peft"]
        cells = " | ".join(f"{best[lib]:.0f} (med {med[lib]:.0f})" for lib in ("frozen", "lorakit", "peft"))
        print(f"| {case} | {cells} | {lk / f:.2f}x | {pf / f:.2f}x | {pf / lk:.2f}x |")


def _profile(cases: dict, case: str, calls: int) -> None:
    import cProfile
    import pstats

    key = case.replace("-", " ")
    fn = cases[key]["lorakit"]
    _time_round(fn, 3)
    profiler = cProfile.Profile()
    profiler.enable()
    _time_round(fn, calls)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="layer,model,mixed", help="comma list of: layer, model, mixed")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40, help="per round (mixed: / 4; decode: / 20 generations)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--profile", default=None, help="cProfile lorakit on one case, e.g. model-fwd+bwd")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="thread: CPU time of this thread")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (tiny shapes: host-bound on a GPU too)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True) instead of plain LoRA")
    args = parser.parse_args()
    global _clock, USE_DORA, DEVICE
    _clock = CLOCKS[args.clock]
    USE_DORA, DEVICE = args.dora, torch.device(args.device)
    torch.set_num_threads(1)
    groups = set(args.cases.split(","))
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    if "layer" in groups:
        cases.update(_layer_cases(args.hidden))
    if "model" in groups:
        cases.update(_model_cases(args.hidden, args.layers))
    if "mixed" in groups:
        cases.update(_mixed_cases(args.hidden, args.layers, args.decode_tokens))
    if args.profile:
        _profile(cases, args.profile, args.calls)
        return
    print(
        f"torch {torch.__version__}, 1 thread, rounds={args.rounds}, calls={args.calls}, hidden={args.hidden}, "
        f"layers={args.layers}, r={RANK}, dora={USE_DORA}, device={DEVICE}, clock={args.clock}; "
        "per-call us, min over rounds (median)"
    )
    times = _run(cases, args.rounds, args.calls)
    _decode_rows(times, args.decode_tokens)
    _print(times)


if __name__ == "__main__":
    main()
