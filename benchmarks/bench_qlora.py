"""QLoRA training step on bitsandbytes' CPU backend: lorakit vs peft on the same 4-bit (nf4) base and adapter weights.

The model: the CPU profile's Llama shape (``cases/common.py``: hidden 256, 4 layers, intermediate 688, 8 heads, 4 kv
heads, vocab 2048, untied head; B2 x T128), built from ``LlamaConfig``, saved once and loaded twice through
transformers' ``BitsAndBytesConfig`` (``load_in_4bit``, nf4, float32 compute dtype, double quantisation off, on the
CPU): one copy per library. LoRA r=16, alpha=32 on all linear layers, ``init_lora_weights=False`` (B != 0), the same
adapter weights in both (lorakit's copied into peft by the shared names). A step: forward with ``labels =
input_ids``, backward, AdamW.

Time: both libraries in one process, steps interleaved round by round (alternating who goes first), median of
``--steps`` after ``--warmup``; wall time and this thread's CPU time (``--threads 1``, the default: on a shared
machine the CPU time does not count waiting for a core), and the ratio of the least-disturbed steps' CPU times (min)
as a second figure. The losses of every step are compared: the step-0 losses and
the largest difference over all steps are printed (the models train in lockstep on the same batch).

    python benchmarks/bench_qlora.py                       # about 2 minutes on 2 shared CPU cores
    python benchmarks/bench_qlora.py --dropout 0.1         # each layer draws its own dropout mask (no q/k/v groups)
    python benchmarks/bench_qlora.py --steps 3 --seq 64    # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from cases.common import PROFILES, llama_model

CPU = PROFILES["cpu"]
SHAPE = {k: CPU[k] for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")}


def quantised_base(path: str, double_quant: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def build(path: str, args: argparse.Namespace) -> dict[str, tuple]:
    """{library: (model, optimizer)} on two copies of the quantised base, holding the same adapter weights."""
    import peft

    import lorakit

    config = dict(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(quantised_base(path, args.double_quant), lorakit.LoraConfig(**config))
    ref = peft.get_peft_model(quantised_base(path, args.double_quant), peft.LoraConfig(**config))
    state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    built = {}
    for name, model in (("peft", ref), ("lorakit", ours)):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 2 * 7 * args.layers
        built[name] = (model, torch.optim.AdamW(params, lr=1e-4))
    return built


def train_step(model, optimizer, inputs, seed: int) -> float:
    torch.manual_seed(seed)  # the same dropout masks in both libraries (both draw them as native_dropout does)
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def timing(built: dict[str, tuple], inputs, args: argparse.Namespace) -> dict[str, dict]:
    cases = list(built)
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    losses: dict[str, list[float]] = {c: [] for c in cases}
    for i in range(args.warmup + args.steps):
        for case in cases if i % 2 == 0 else cases[::-1]:
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = train_step(*built[case], inputs, seed=i)
            t1, c1 = time.perf_counter(), time.thread_time()
            losses[case].append(loss)
            if i >= args.warmup:
                wall[case].append(t1 - t0)
                cpu[case].append(c1 - c0)
    results = {}
    for case in cases:
        results[case] = {
            "wall_s": statistics.median(wall[case]),
            "cpu_s": statistics.median(cpu[case]),
            "cpu_min_s": min(cpu[case]),
        }
        print(
            f"time   {case:8s} step wall {results[case]['wall_s']:7.3f} s  cpu {results[case]['cpu_s']:7.3f} s"
            f"  (min wall {min(wall[case]):.3f}, cpu {min(cpu[case]):.3f})  step-0 loss {losses[case][0]:.6f}",
            flush=True,
        )
    gap = max(abs(a - b) for a, b in zip(losses["lorakit"], losses["peft"]))
    print(f"losses over {len(losses['peft'])} steps: largest |lorakit - peft| = {gap:.2e}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=CPU["train_batch"])
    parser.add_argument("--seq", type=int, default=CPU["train_seq"])
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--double-quant", action="store_true", help="bnb_4bit_use_double_quant=True")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers

    shape = {**SHAPE, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate}
    print(
        f"{shape} B{args.batch} x T{args.seq}, dropout {args.dropout}, double quant {args.double_quant}, "
        f"threads {args.threads}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )
    with tempfile.TemporaryDirectory() as path:
        llama_model(shape, "cpu", torch.float32, max_positions=max(2048, args.seq)).save_pretrained(path)
        built = build(path, args)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    t = timing(built, {"input_ids": ids, "labels": ids.clone()}, args)
    print(
        f"time   lorakit / peft: wall {t['lorakit']['wall_s'] / t['peft']['wall_s']:.2f}x, "
        f"cpu {t['lorakit']['cpu_s'] / t['peft']['cpu_s']:.2f}x (medians); "
        f"min cpu {t['lorakit']['cpu_min_s'] / t['peft']['cpu_min_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
