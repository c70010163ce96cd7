"""Launching aten calls per LoRA layer and training step (``benchmarks/count_ops.py``): the fast paths' host cost on
a GPU grows with this count, so a change that adds launches to the fused nodes shows up here. Deterministic counts,
not timings; compared with peft's on the same model."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from count_ops import count


@pytest.mark.parametrize(("dora", "most"), [(False, 8), (True, 18)])  # 2 decoder layers: DoRA groups of 2
def test_fused_nodes_launch_less_than_peft(dora, most):
    layers = 2
    _, floor, _ = count("lorakit", False, layers, frozen=True)
    _, peft_launches, n = count("peft", dora, layers)
    _, ours, _ = count("lorakit", dora, layers)
    per_layer, peft_per_layer = (ours - floor) / n, (peft_launches - floor) / n
    assert per_layer <= most, f"{per_layer:.1f} launches per LoRA layer (peft {peft_per_layer:.1f})"
    assert per_layer < 0.6 * peft_per_layer
