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


def best_of(a: Row, b: Row) -> Row:
    """The same case from two rounds: each column's smaller time (the least disturbed run)."""

    def low(x: float | None, y: float | None) -> float | None:
        return y if x is None else x if y is None else min(x, y)

    return Row(
        a.group, a.case, low(a.base_ms, b.base_ms), low(a.peft_ms, b.peft_ms), low(a.lorakit_ms, b.lorakit_ms), a.notes
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all groups, keep each time's best (noisy hosts)")
    parser.add_argument("--tune", action="store_true", help="pick the fused node's weight-gradient split first")
    parser.add_argument("--trace", action="store_true", help="print the top kernels of one lorakit training step")
    parser.add_argument("--mixed-backends", default="auto", help="CUDA mixed-batch backends: auto,torch,triton")
    args = parser.parse_args()
    profile = dict(PROFILES[args.profile])
    if args.threads:
        torch.set_num_threads(args.threads)
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
    for round_index in range(max(1, args.rounds)):
        round_rows: list[Row] = []
        for group in groups:
            log(f"group {group}" + (f", round {round_index + 1}" if args.rounds > 1 else ""))
            group_rows, base = GROUPS[group](base, profile, device, log)
            round_rows.extend(group_rows)
        rows = round_rows if not rows else [best_of(a, b) for a, b in zip(rows, round_rows)]
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    header = f"### {datetime.date.today()} · {hardware(device)} · `{command}`\n\n{'; '.join([versions(), *notes])}"
    table = markdown(rows, header)
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
