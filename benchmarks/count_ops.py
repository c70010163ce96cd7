"""Aten calls per training step (forward + backward), lorakit vs peft: a device-free proxy for host cost on a GPU,
where each call costs dispatch and launch time (~10 us on a busy step) whatever its size.

    python benchmarks/count_ops.py                 # LoRA and DoRA on a 16-layer tiny Llama, bf16, r=4 all-linear

Counts every aten call of one step after three warm-up steps (caches filled, batches primed), and separately the
calls that launch work (views and allocations excluded); per LoRA layer = launching calls / number of LoRA layers.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases.common import llama_model

NO_LAUNCH = {
    "view", "t", "unsqueeze", "expand", "detach", "_unsafe_view", "permute", "empty", "empty_like", "transpose",
    "reshape", "as_strided", "select", "unbind", "split", "split_with_sizes", "alias", "slice", "squeeze",
    "resize_",  # the fused nodes' (N, out) -> (..., out) in place: same element count, metadata only
}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(lib: str, dora: bool, layers: int, frozen: bool = False) -> tuple[int, int, int]:
    """(all calls, launching calls, LoRA layers) of one fwd + bwd step."""
    mod = __import__(lib)
    shape = dict(hidden=64, layers=layers, intermediate=128, heads=4, kv_heads=2, vocab=256)
    model = llama_model(shape, "cpu", torch.bfloat16)
    model.requires_grad_(False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    n_layers = 0
    if frozen:
        embed = model.get_input_embeddings()

        def step():
            model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss.backward()
    else:
        config = mod.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
        model = mod.get_peft_model(model, config)
        n_layers = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with _Count() as counter:
        step()
    launching = sum(v for k, v in counter.calls.items() if k not in NO_LAUNCH)
    return sum(counter.calls.values()), launching, n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, floor, _ = count("lorakit", False, args.layers, frozen=True)
    print(f"frozen floor: {floor} launching calls per step ({args.layers} decoder layers)")
    print("| case | peft calls (launching) | lorakit calls (launching) | launches per LoRA layer, peft / lorakit |")
    print("| --- | --- | --- | --- |")
    for dora in (False, True):
        p_all, p_launch, n = count("peft", dora, args.layers)
        l_all, l_launch, _ = count("lorakit", dora, args.layers)
        per = f"{(p_launch - floor) / n:.1f} / {(l_launch - floor) / n:.1f}"
        print(f"| {'DoRA' if dora else 'LoRA'} | {p_all} ({p_launch}) | {l_all} ({l_launch}) | {per} |")


if __name__ == "__main__":
    main()
