"""Mixed-adapter batches (peft's ``adapter_names``) on a patched peft model: the gathered kernels, same numbers and
the same errors as unpatched peft."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_cases import GPT2_TARGETS, LLAMA_TARGETS, assert_close, count_fast_paths, lora_layer_count, pair, tokens


def _with_second_adapter(models, arch: str, **config) -> None:
    """Adds adapter "other" (rank 8, random) to both models with the same weights; only on some targets."""
    targets = (LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS)[:2]
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    state = None
    for model in models:
        torch.manual_seed(11)
        cfg = peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets, init_lora_weights=False, **extra, **config)
        model.add_adapter("other", cfg)
        if state is None:
            state = peft.get_peft_model_state_dict(model, adapter_name="other")
        else:
            peft.set_peft_model_state_dict(model, state, adapter_name="other")
        model.eval()  # peft takes adapter_names in eval mode only


NAMES = ["default", "other", "__base__", "other"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_forward(monkeypatch, arch):
    patched, reference = pair(arch)
    _with_second_adapter((patched, reference), arch)
    ids = tokens(batch=4)
    with torch.no_grad(), count_fast_paths(monkeypatch) as hits:
        assert_close(
            patched(input_ids=ids, adapter_names=NAMES).logits, reference(input_ids=ids, adapter_names=NAMES).logits
        )
    assert hits.mixed == lora_layer_count(patched)
    # and the rows equal single-adapter calls
    with torch.no_grad():
        patched.set_adapter("other")
        assert_close(patched(input_ids=ids[1:2]).logits, reference(input_ids=ids, adapter_names=NAMES).logits[1:2])


def test_mixed_batch_generate(monkeypatch):
    patched, reference = pair()
    _with_second_adapter((patched, reference), "llama")
    ids = tokens(batch=4, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, adapter_names=NAMES, pad_token_id=0)
    with count_fast_paths(monkeypatch) as hits:
        ours = patched.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours, reference.generate(input_ids=ids, **kwargs))
    assert hits.mixed == 6 * lora_layer_count(patched)  # prefill and 5 decode steps, every layer


def test_mixed_batch_with_gradients_keeps_peft_forward(monkeypatch):
    """The gathered kernels hold detached factors: with gradients into the adapters, peft's forward runs."""
    patched, reference = pair()
    _with_second_adapter((patched, reference), "llama")
    ids = tokens(batch=4)
    with count_fast_paths(monkeypatch) as hits:
        assert_close(
            patched(input_ids=ids, adapter_names=NAMES).logits, reference(input_ids=ids, adapter_names=NAMES).logits
        )
    assert hits.mixed == 0


def test_mixed_batch_errors_are_peft_errors():
    patched, reference = pair()
    patched.eval(), reference.eval()
    ids = tokens(batch=4)
    errors = []
    for model in (patched, reference):
        with pytest.raises(ValueError) as length:
            model(input_ids=ids, adapter_names=["default"])
        model.merge_adapter()
        with pytest.raises(ValueError) as merged:
            model(input_ids=ids, adapter_names=["default"] * 4)
        errors.append((str(length.value), str(merged.value)))
    assert errors[0] == errors[1]
    assert "merged" in errors[0][1]
