"""``lorakit inspect DIR``: what a saved adapter holds, read from its files alone (no base model needed).

Works on adapters written by lorakit or by peft: base model, targets, rank and alpha per layer (rank_pattern /
alpha_pattern resolved), parameter count, and per layer the Frobenius norms of B @ A and of the weight update
scaling * B @ A. ``--plot FILE.png`` draws the update norms; ``--json`` prints everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import CliError, one_line

HELP = "show what a saved LoRA adapter contains (ranks, alphas, per-layer update norms)"
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="DIR", help="adapter folder (or Hub id)")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of the per-layer update norms")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


@dataclass
class LayerReport:
    module: str
    kind: str  # linear | conv | embedding
    shape: tuple[int, ...]  # the weight update's shape: (out, in) / (num_embeddings, dim) / conv weight shape
    r: int
    alpha: float
    scaling: float
    norm_ba: float | None  # ||B @ A||_F, None for grouped convolutions
    norm_delta: float | None  # ||scaling * B @ A||_F
    dora: bool
    lora_bias: bool


def product_norm(b: Any, a: Any) -> float:
    """||B @ A||_F without forming B @ A: sqrt(sum((B^T B) * (A A^T))), in float64. B (out, r), A (r, in)."""
    a, b = a.double(), b.double()
    gram = (b.T @ b) * (a @ a.T)  # (r, r) elementwise (r, r)
    return math.sqrt(max(gram.sum().item(), 0.0))


def _layer(module: str, parts: dict[str, Any], config: Any) -> LayerReport:
    from ..targeting import rank_and_alpha

    embedding = "lora_embedding_A" in parts
    a = parts["lora_embedding_A" if embedding else "lora_A.weight"]  # (r, in) / (r, num_emb) / (r, in, *k)
    b = parts["lora_embedding_B" if embedding else "lora_B.weight"]  # (out, r) / (dim, r) / (out, r/groups, 1..)
    r = a.shape[0]
    _, alpha = rank_and_alpha(config, module)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    b2, a2 = b.reshape(b.shape[0], -1), a.reshape(r, -1)
    norm = product_norm(b2, a2) if b2.shape[1] == r else None
    if embedding:
        kind, shape = "embedding", (a.shape[1], b.shape[0])
    elif a.dim() > 2:
        kind, shape = "conv", (b.shape[0], *a.shape[1:])
    else:
        kind, shape = "linear", (b.shape[0], a.shape[1])
    return LayerReport(
        module=module,
        kind=kind,
        shape=tuple(int(s) for s in shape),
        r=int(r),
        alpha=float(alpha),
        scaling=float(scaling),
        norm_ba=norm,
        norm_delta=None if norm is None else abs(scaling) * norm,
        dora="lora_magnitude_vector" in parts,
        lora_bias="lora_B.bias" in parts,
    )


def read_adapter(folder: str) -> tuple[Any, dict[str, Any]]:
    """(LoraConfig, tensors) of a saved adapter; one-line errors for missing or broken files."""
    from ..config import LoraConfig
    from ..io.checkpoint import read_adapter_weights

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = LoraConfig.from_pretrained(folder)
        tensors = read_adapter_weights(folder)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"cannot read adapter {folder!r}: {one_line(err)}") from None
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    return config, tensors


def analyse(config: Any, tensors: dict[str, Any]) -> tuple[list[LayerReport], dict[str, tuple[int, ...]]]:
    """(one report per adapted module in file order, other tensors -> shape, e.g. modules_to_save)."""
    grouped: dict[str, dict[str, Any]] = {}
    others: dict[str, tuple[int, ...]] = {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            others[key] = tuple(tensor.shape)
        else:
            grouped.setdefault(match["module"], {})[match["part"]] = tensor
    layers = []
    for module, parts in grouped.items():
        if not ({"lora_A.weight", "lora_B.weight"} <= parts.keys() or "lora_embedding_A" in parts):
            raise CliError(f"adapter tensors of {module!r} are incomplete: found {sorted(parts)}.")
        layers.append(_layer(module, parts, config))
    return layers, others


def _summary(folder: str, config: Any, tensors: dict[str, Any], layers: list[LayerReport], others: dict) -> dict:
    n_params = sum(int(t.numel()) for t in tensors.values())
    n_full = sum(math.prod(shape) for shape in others.values())
    n_bytes = sum(int(t.numel()) * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {
        "adapter": folder,
        "base_model": config.base_model_name_or_path,
        "revision": config.revision,
        "task_type": getattr(config.task_type, "value", config.task_type),
        "target_modules": config.target_modules,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": config.modules_to_save,
        "adapted_modules": len(layers),
        "parameters": n_params,
        "lora_parameters": n_params - n_full,
        "bytes": n_bytes,
        "dtypes": dtypes,
        "peft_version": config.peft_version,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _print_report(summary: dict[str, Any], layers: list[LayerReport], others: dict[str, tuple[int, ...]]) -> None:
    from .table import print_table

    print(f"adapter      {summary['adapter']}")
    print(f"base model   {summary['base_model']}" + (f" @ {summary['revision']}" if summary["revision"] else ""))
    print(f"task type    {summary['task_type']}   init {summary['init_lora_weights']!r}")
    flags = [name for name in ("use_rslora", "use_dora") if summary[name]]
    print(f"targets      {summary['target_modules']}   ({summary['adapted_modules']} modules adapted)")
    print(
        f"rank/alpha   r={summary['r']} alpha={summary['lora_alpha']}"
        + (f" rank_pattern={summary['rank_pattern']}" if summary["rank_pattern"] else "")
        + (f" alpha_pattern={summary['alpha_pattern']}" if summary["alpha_pattern"] else "")
        + (f" ({', '.join(flags)})" if flags else "")
    )
    print(
        f"parameters   {summary['parameters']:,} ({summary['bytes'] / 1e6:.2f} MB, {'/'.join(summary['dtypes'])})"
        + (
            f": {summary['lora_parameters']:,} in LoRA factors, the rest in {len(others)} full tensors"
            if others
            else ""
        )
    )
    rows = [
        [
            layer.module,
            layer.kind + (" +DoRA" if layer.dora else ""),
            "x".join(str(s) for s in layer.shape),
            str(layer.r),
            f"{layer.alpha:g}",
            f"{layer.scaling:.4g}",
            _fmt(layer.norm_ba),
            _fmt(layer.norm_delta),
        ]
        for layer in layers
    ]
    print_table(["module", "type", "update shape", "r", "alpha", "scaling", "|B@A|_F", "|scaling*B@A|_F"], rows)
    for key, shape in others.items():
        print(f"full tensor  {key} {tuple(shape)}")


def run(args: argparse.Namespace) -> int:
    from .sources import check_adapter

    check_adapter(args.adapter, "adapter")
    config, tensors = read_adapter(args.adapter)
    layers, others = analyse(config, tensors)
    summary = _summary(args.adapter, config, tensors, layers, others)
    if args.json:
        report = summary | {"layers": [asdict(layer) for layer in layers], "other_tensors": others}
        print(json.dumps(report, indent=1, default=str))
    else:
        _print_report(summary, layers, others)
    if args.plot:
        from .plots import plot_norms

        usable = [layer for layer in layers if layer.norm_delta is not None]
        path = plot_norms(
            Path(args.plot),
            [layer.module for layer in usable],
            [layer.norm_delta for layer in usable],
            title=f"LoRA update norms: {Path(args.adapter).name or args.adapter}",
        )
        if not args.json:
            print(f"plot written to {path}")
    return 0
