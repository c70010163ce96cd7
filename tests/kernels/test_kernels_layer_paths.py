"""Fast paths wired into the LoRA Linear layer: same outputs, gradients and training as the reference path."""

from __future__ import annotations

import pytest
import torch

import lorakit.kernels.lora_linear as lora_linear_module
from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import use_reference
from models import tiny_llama


def _model(dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(seed).to(dtype)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _loss_and_grads(model, ids, reference: bool, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with use_reference(reference):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _count_fused(monkeypatch):
    calls = {"n": 0}
    original = lora_linear_module.FusedLoraLinear.apply

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(lora_linear_module.FusedLoraLinear, "apply", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_matches_reference_and_uses_the_fused_node(monkeypatch, dtype):
    model = _model(dtype=dtype).train()
    ids = torch.randint(0, 96, (3, 12))
    calls = _count_fused(monkeypatch)
    logits_fast, grads_fast = _loss_and_grads(model, ids, reference=False)
    assert calls["n"] == 14  # 2 layers x 7 linears
    logits_ref, grads_ref = _loss_and_grads(model, ids, reference=True)
    assert calls["n"] == 14
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((logits_fast - logits_ref).norm() / logits_ref.norm()) < tol
    assert grads_fast.keys() == grads_ref.keys() and len(grads_fast) == 28
    for name, grad in grads_ref.items():
        assert grads_fast[name].dtype == torch.float32  # float32 masters on a bf16 base
        assert ((grads_fast[name] - grad).norm() / grad.norm()) < tol * 10, name


def test_adamw_steps_follow_the_reference_trajectory():
    ids = torch.randint(0, 96, (2, 10))
    losses = {}
    for reference in (False, True):
        model = _model(seed=3).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with use_reference(reference):
            run = []
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                run.append(loss.item())
        losses[reference] = run
    assert losses[False] == pytest.approx(losses[True], rel=1e-4)
    assert losses[False][-1] < losses[False][0]


def test_dropout_training_is_random_but_eval_matches_reference(monkeypatch):
    model = _model(dropout=0.3)
    ids = torch.randint(0, 96, (2, 10))
    calls = _count_fused(monkeypatch)
    model.train()
    _, grads = _loss_and_grads(model, ids, reference=False)
    assert calls["n"] == 14 and all(torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        with use_reference():
            ref = model(input_ids=ids).logits
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = torch.randint(0, 96, (2, 10))
    model = _model(dropout=0.2).train()
    _, plain = _loss_and_grads(model, ids, reference=False, seed=5)
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.get_base_model().enable_input_require_grads()
    _, checkpointed = _loss_and_grads(model, ids, reference=False, seed=5)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_torch_compile_gives_the_reference_gradients():
    torch._dynamo.reset()
    model = _model().train()
    ids = torch.randint(0, 96, (2, 8))
    _, ref = _loss_and_grads(model, ids, reference=True)
    compiled = torch.compile(model, backend="aot_eager")
    _, fast = _loss_and_grads(compiled, ids, reference=False)
    for name, grad in ref.items():
        key = name if name in fast else f"_orig_mod.{name}"
        torch.testing.assert_close(fast[key], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_inference_cast_cache_follows_weight_changes():
    model = _model(dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["default"].weight.mul_(3.0)  # in-place edit: the cached bf16 copy must be rebuilt
        after = model(input_ids=ids).logits
        with use_reference():
            ref = model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert ((after.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_several_active_adapters_and_disabled_adapters_take_the_reference_route(monkeypatch):
    model = _model().eval()
    model.add_adapter("second", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    ids = torch.randint(0, 96, (2, 8))
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        with use_reference():
            ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert calls["n"] == 0
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fast, base)
