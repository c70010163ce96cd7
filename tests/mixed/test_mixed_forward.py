"""Mixed-adapter batches in forward: row by row equal to running each adapter alone, and equal to peft's mixed batch."""

from __future__ import annotations

import pytest
import torch
from mixed_cases import CASES, PEFT_CANNOT_MIX, batch, build_pair, names_for, separate_forward

from lorakit.kernels.switch import use_reference
from lorakit.routing import current_routing
from models import output_tensor

ATOL = 1e-5


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("kind", list(CASES))
def test_mixed_forward_matches_separate_runs_and_peft(kind, path):
    with use_reference(path == "reference"):
        _check_mixed_forward(kind)


def _check_mixed_forward(kind: str) -> None:
    ours, ref = build_pair(kind)
    names = names_for(kind)
    inputs = batch(kind, len(names))
    expected = separate_forward(ours, kind, names, inputs)
    with torch.no_grad():
        mixed = output_tensor(ours(**inputs, adapter_names=names))
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)
    if kind not in PEFT_CANNOT_MIX:
        with torch.no_grad():
            peft_mixed = output_tensor(ref(**inputs, adapter_names=names))
        torch.testing.assert_close(mixed, peft_mixed, atol=ATOL, rtol=0)
    # every adapter really changes its rows, so the comparison above can tell rows apart
    base_rows = [i for i, n in enumerate(names) if n == "__base__"]
    with torch.no_grad(), ours.disable_adapter():
        base = output_tensor(ours(**inputs))
    for i, name in enumerate(names):
        if i not in base_rows:
            assert (mixed[i] - base[i]).abs().max() > 1e-3, f"adapter {name} did not change row {i}"
    assert current_routing() is None


def test_modules_to_save_rows_use_their_own_copy():
    ours, _ = build_pair("mlp")  # "two" has its own copy of ``head``; "one" and __base__ use the original
    head = ours.base_model.model.head
    names = ["one", "two", "__base__", "two"]
    inputs = batch("mlp", 4)
    with torch.no_grad():
        mixed = ours(**inputs, adapter_names=names)
        seen = []
        handle = head.modules_to_save["two"].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        ours(**inputs, adapter_names=names)
        handle.remove()
    assert seen == [2]  # only the two rows of "two" went through its copy
    torch.testing.assert_close(mixed, separate_forward(ours, "mlp", names, inputs), atol=ATOL, rtol=0)


def test_all_rows_one_adapter_equals_plain_forward():
    ours, _ = build_pair("llama")
    inputs = batch("llama", 3)
    ours.set_adapter("two")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs, adapter_names=["two"] * 3).logits, ours(**inputs).logits, atol=ATOL, rtol=0
        )
        with ours.disable_adapter():
            base = ours(**inputs).logits
        torch.testing.assert_close(ours(**inputs, adapter_names=["__base__"] * 3).logits, base, atol=ATOL, rtol=0)


def test_mixed_batch_leaves_active_adapter_and_grad_flags_alone():
    ours, _ = build_pair("llama")
    ours.set_adapter("one")
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    with torch.no_grad():
        ours(**batch("llama", 4), adapter_names=["two", "three", "one", "__base__"])
    assert ours.active_adapters == ["one"]
    assert flags == {n: p.requires_grad for n, p in ours.named_parameters()}
