"""Patched peft equals unpatched peft: outputs, gradients and 20 AdamW steps (fp32, 1e-5 relative), with the fast
paths actually taken (counted) for plain LoRA and DoRA on Linear (tiny llama) and Conv1D (tiny GPT-2)."""

from __future__ import annotations

import pytest
import torch
from peft_cases import (
    assert_close,
    assert_same_grads,
    count_fast_paths,
    lora_layer_count,
    pair,
    relative_error,
    tokens,
)

CASES = [
    pytest.param("llama", {}, True, id="llama-lora"),
    pytest.param("llama", {"use_dora": True}, True, id="llama-dora"),
    pytest.param("llama", {"use_rslora": True, "lora_alpha": 3}, True, id="llama-rslora"),
    pytest.param("gpt2", {}, True, id="gpt2-conv1d-lora"),
    pytest.param("gpt2", {"use_dora": True}, False, id="gpt2-conv1d-dora"),  # DoRA on Conv1D stays peft's
]


@pytest.mark.parametrize(("arch", "config", "fast"), CASES)
def test_training_step_outputs_and_gradients(monkeypatch, arch, config, fast):
    patched, reference = pair(arch, **config)
    patched.train(), reference.train()
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        torch.manual_seed(7)  # GPT-2's own dropouts draw from the same stream in both
        out = patched(input_ids=ids, labels=ids)
    torch.manual_seed(7)
    expected = reference(input_ids=ids, labels=ids)
    assert_close(out.logits, expected.logits)
    out.loss.backward()
    expected.loss.backward()
    assert_same_grads(patched, reference)
    assert hits.fused == (lora_layer_count(patched) if fast else 0)


@pytest.mark.parametrize(("arch", "config", "fast"), CASES)
def test_inference_outputs(monkeypatch, arch, config, fast):
    patched, reference = pair(arch, **config)
    ids = tokens()
    with torch.no_grad(), count_fast_paths(monkeypatch) as hits:
        for _ in range(2):  # the second call runs the shared-input groups learned in the first
            assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert hits.fused == (2 * lora_layer_count(patched) if fast else 0)


@pytest.mark.parametrize(("arch", "config", "fast"), CASES)
def test_twenty_adamw_steps(monkeypatch, arch, config, fast):
    patched, reference = pair(arch, **config)
    patched.train(), reference.train()
    initial = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    runs = []
    with count_fast_paths(monkeypatch) as hits:
        for model in (patched, reference):
            params = [p for p in model.parameters() if p.requires_grad]
            # 1e-3: at 1e-2 this tiny random llama amplifies rounding-order differences of the fused GEMMs (1e-7 per
            # step) to ~6e-5 after 20 steps, for lorakit's own layers against their reference path too
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            losses = []
            for step in range(20):
                ids = tokens(seed=step)
                torch.manual_seed(step)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
            runs.append((torch.stack(losses), {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (ours, our_params), (theirs, their_params) = runs
    assert_close(ours, theirs)
    # Adam divides by sqrt(v): entries whose gradients are ~0 amplify rounding, so compare each tensor as a whole
    errors = {name: relative_error(our_params[name], value) for name, value in their_params.items()}
    print(f"20 AdamW steps, largest relative parameter error: {max(errors.values()):.2e}")
    assert max(errors.values()) < 1e-5, errors
    assert hits.fused == (20 * lora_layer_count(patched) if fast else 0)
    assert max(relative_error(value, initial[name]) for name, value in their_params.items()) > 1e-2  # they trained


def test_dropout_in_training_keeps_peft_forward(monkeypatch):
    """lora_dropout > 0 in training: peft draws the masks, so the same seed gives the same numbers."""
    patched, reference = pair(lora_dropout=0.3)
    patched.train(), reference.train()
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        torch.manual_seed(3)
        out = patched(input_ids=ids, labels=ids)
        torch.manual_seed(3)
        expected = reference(input_ids=ids, labels=ids)
        assert_close(out.logits, expected.logits)
        assert hits.fused == 0
        patched.eval(), reference.eval()  # eval: dropout off, the fused path again
        with torch.no_grad():
            assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert hits.fused == lora_layer_count(patched)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(monkeypatch, reentrant):
    """TRL's SFTConfig turns gradient checkpointing on by default."""
    patched, reference = pair()
    for model in (patched, reference):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        out = patched(input_ids=ids, labels=ids)
        out.loss.backward()
    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert_close(out.logits, expected.logits)
    assert_same_grads(patched, reference)
    assert hits.fused >= lora_layer_count(patched)


@pytest.mark.parametrize(
    ("config", "node", "count"),
    [
        ({}, "SharedInputLoraBackward", 4),  # q/k/v and gate/up of 2 blocks, from the second call on
        ({}, "FusedLoraLinearBackward", 4),  # o_proj and down_proj of 2 blocks
        ({"use_dora": True}, "FusedDoraLinearBackward", 14),  # every DoRA Linear
    ],
)
def test_the_graph_holds_lorakit_nodes(config, node, count):
    from training_helpers import autograd_node_names

    patched, _ = pair(**config)
    patched.train()
    ids = tokens()
    patched(input_ids=ids, labels=ids).loss.backward()  # the first call learns the shared-input groups
    names = autograd_node_names(patched(input_ids=ids, labels=ids).loss)
    assert names.count(node) == count, sorted(set(names))


@pytest.mark.parametrize("config", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_bfloat16_base_with_float32_adapters(monkeypatch, config):
    """A bfloat16 model (peft keeps float32 adapter weights): the fused nodes compute the adapter term in bfloat16
    where peft upcasts to float32, so the two agree to bfloat16 rounding; gradients stay float32."""
    patched, reference = pair(**config)
    for model in (patched, reference):
        model.base_model.model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        model.train()
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        out = patched(input_ids=ids, labels=ids)
        out.loss.backward()
    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert hits.fused == lora_layer_count(patched)
    assert relative_error(out.logits.float(), expected.logits.float()) < 2e-2
    ours = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and all(g.dtype == torch.float32 for g in ours.values())
    assert max(relative_error(ours[n], theirs[n]) for n in theirs) < 5e-2
