"""lorakit vs peft, side by side in one process on the same model, adapter weights and inputs.

    python benchmarks/run.py --profile cpu            # 2 CPU cores, a few minutes (``make bench``)
    python benchmarks/run.py --profile gpu            # the H200 profile: 1.1B Llama shape, bf16, r=16 all-linear
    python benchmarks/run.py --profile gpu --groups training,layer --out results.md

Groups: training (frozen floor, LoRA AdamW step, dropout 0.1, peak memory), inference (prefill base / 1 adapter /
mixed batches, decode steps with mixed adapters), layer (one d x d LoRA Linear, fwd + bwd). Ratios are to the
group's baseline (floor, base model, frozen layer); "lorakit vs peft" is peft's time over lorakit's.
Prints markdown rows (date, hardware, command) and appends them to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import inference, layer, training, tune
from cases.common import PROFILES, Row, build_llama, fmt_ms

GROUPS = {"training": training.run, "inference": inference.run, "layer": layer.run}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> str:
    import peft
    import transformers

    import lorakit

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, " + (
        f"lorakit {lorakit.__version__}"
    )


def markdown(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| case | baseline ms | peft ms | lorakit ms | peft / base | lorakit / base | lorakit vs peft | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        p_ratio, l_ratio, speedup = row.ratios()
        cells = [row.case, fmt_ms(row.base_ms), fmt_ms(row.peft_ms), fmt_ms(row.lorakit_ms), p_ratio, l_ratio]
        lines.append("| " + " | ".join([*cells, speedup, row.notes]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    parser.add_argument("--device", default=None, help="default: cuda for the gpu profile, else cpu")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count (quick checks)")
    parser.add_argument("--tune", action="store_true", help="pick the fused node's weight-gradient split first")
    parser.add_argument("--trace", action="store_true", help="print the top kernels of one lorakit training step")
    parser.add_argument("--mixed-backends", default="auto", help="CUDA mixed-batch backends: auto,torch,triton")
    args = parser.parse_args()
    profile = dict(PROFILES[args.profile])
    if args.layers:
        profile["layers"] = args.layers
    profile["trace"] = args.trace
    profile["mixed_backends"] = [b.strip() for b in args.mixed_backends.split(",") if b.strip()]
    device = torch.device(args.device or ("cuda" if args.profile == "gpu" else "cpu"))
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; available: {sorted(GROUPS)}")

    def log(message: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)

    log(f"{versions()}; {hardware(device)}")
    notes = []
    if args.tune:
        notes.append(f"tuned WGRAD_CHUNKS={tune.run(profile, device, log)}")
    base = build_llama(profile, device) if {"training", "inference"} & set(groups) else None
    rows: list[Row] = []
    for group in groups:
        log(f"group {group}")
        group_rows, base = GROUPS[group](base, profile, device, log)
        rows.extend(group_rows)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    header = f"### {datetime.date.today()} · {hardware(device)} · `{command}`\n\n{'; '.join([versions(), *notes])}"
    table = markdown(rows, header)
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
