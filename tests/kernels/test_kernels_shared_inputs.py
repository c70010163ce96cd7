"""Layers that read the same input share one node (``kernels/shared_input_linear.py``, ``kernels/shared_inputs.py``):
outputs and every gradient equal the per-layer nodes', groups are learned from the previous call, and anything that
breaks a group (another input, a hook, checkpointing) falls back to the per-layer nodes with the same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit.kernels import shared_inputs
from lorakit.kernels.lora_linear import fused_lora_linear
from lorakit.kernels.shared_input_linear import shared_input_lora
from models import tiny_llama
from training_helpers import autograd_node_names, sgd_losses

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _members(device: str, need_w: bool) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    specs = [(24, 4, 2.0, True), (8, 2, 0.5, False), (16, 8, 1.0, True)]  # (out, r, scaling, bias)
    members = []
    for out, r, scaling, has_bias in specs:
        weight = torch.randn(out, 32, generator=g).to(device).requires_grad_(need_w)
        bias = torch.randn(out, generator=g).to(device) if has_bias else None
        lora_a = torch.randn(r, 32, generator=g).to(device).requires_grad_(True)
        lora_b = torch.randn(out, r, generator=g).to(device).requires_grad_(True)
        members.append((weight, bias, lora_a, lora_b, scaling))
    return members


def _grads(tensors) -> list[torch.Tensor | None]:
    out = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)], ids=["all-used", "one-unused"])
def test_node_equals_per_layer_nodes(device, x_grad, used):
    members = _members(device, need_w=not x_grad)  # W trainable in one variant: dW through the group too
    x = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(1)).to(device)  # N = 512 tokens
    x.requires_grad_(x_grad)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(2, 256, m[0].shape[0], generator=g).to(device) for m in members]  # mixes each output
    leaves = [x] + [t for m in members for t in m[:4] if t is not None and t.requires_grad]

    grouped = shared_input_lora(x, members)
    sum((grouped[i] * weights[i]).sum() for i in used).backward()
    got = _grads(leaves)
    single = [fused_lora_linear(x, *m) for m in members]
    sum((single[i] * weights[i]).sum() for i in used).backward()
    want = _grads(leaves)
    for a, b in zip(grouped, single):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any())
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)  # float32 sums over 512 tokens, another order


def _model(seed: int = 0):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(seed)
    return lorakit.get_peft_model(tiny_llama(seed), config).train()


def test_groups_form_from_the_second_call_and_train_the_same(monkeypatch):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _model()
    first = autograd_node_names(model(input_ids=ids, labels=ids).loss)
    second = autograd_node_names(model(input_ids=ids, labels=ids).loss)
    assert first.count("SharedInputLoraBackward") == 0  # nothing learned yet
    assert second.count("SharedInputLoraBackward") == 2 * 2  # q/k/v and gate/up in each of the 2 decoder layers
    assert second.count("FusedLoraLinearBackward") == 2 * 2  # o_proj, down_proj alone
    grouped = sgd_losses(_model(), ids, 4)
    monkeypatch.setattr(shared_inputs, "ENABLED", False)
    alone = sgd_losses(_model(), ids, 4)
    assert grouped == pytest.approx(alone, abs=1e-5)
    assert grouped[-1] < grouped[0]


class _TwoHeads(nn.Module):
    """a(x) and b(x), or b(y) when y is given: the second call breaks the group learned in the first."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.a(x) * self.b(x if y is None else y)


def _heads():
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False)
    return lorakit.get_peft_model(_TwoHeads(), config)


def _step(model, *inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(*inputs)
    out.square().sum().backward()
    return out.detach(), _grads([p for p in model.parameters() if p.requires_grad])


def test_a_member_called_on_another_input_computes_alone(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    model = _heads()
    _step(model, x)  # learns the group (a, b)
    grouped_names = autograd_node_names(model(x).sum())
    assert "SharedInputLoraBackward" in grouped_names
    got = _step(model, x, y)  # a computes both, b is called on y: its kept output must not be used
    monkeypatch.setattr(shared_inputs, "ENABLED", False)
    want = _step(_heads(), x, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)  # a's output: one GEMM for both heads
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_hook_on_a_member_breaks_the_group(monkeypatch):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    model = _heads()
    _step(model, x)
    calls = []
    model.base_model.model.b.base_layer.register_forward_hook(lambda *args: calls.append(1))
    got = _step(model, x)
    assert calls == [1]  # the member ran its own (reference) path, hook included
    assert "SharedInputLoraBackward" not in autograd_node_names(model(x).sum())
    monkeypatch.setattr(shared_inputs, "ENABLED", False)
    reference = _heads()
    reference.base_model.model.b.base_layer.register_forward_hook(lambda *args: None)
    want = _step(reference, x)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_as_without(monkeypatch, reentrant):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    checkpointed = sgd_losses(model, ids, 3)
    assert "SharedInputLoraBackward" not in autograd_node_names(model(input_ids=ids, labels=ids).loss)
    plain = sgd_losses(_model(), ids, 3)
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_inference_groups_under_no_grad_but_not_under_inference_mode(monkeypatch):
    """(``generate`` calls the inner model directly, outside ``LoraModel.forward``: no model-call scope there.)"""
    from lorakit.kernels import shared_input_linear

    calls = []
    real = shared_input_linear.shared_input_inference
    monkeypatch.setattr(shared_inputs, "shared_input_inference", lambda *a: (calls.append(1), real(*a))[1])
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    model = _model().eval()
    with torch.no_grad():
        model(input_ids=ids)
        grouped = model(input_ids=ids).logits
    assert len(calls) == 2 * 2  # q/k/v and gate/up of both decoder layers, on the second call
    with torch.inference_mode():
        model(input_ids=ids)
        model(input_ids=ids)
    assert len(calls) == 4  # inference tensors have no version counter: never grouped
    monkeypatch.setattr(shared_inputs, "ENABLED", False)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-4)
