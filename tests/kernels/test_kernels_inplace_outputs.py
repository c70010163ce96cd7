"""Every fast path hands back an output the caller may edit in place, as a plain layer's (issue 15, item 1).

The issue's model divides one projection's output in place and adds to another's in place. On each fast path (the
fused LoRA node, the fused DoRA node, the shared-input group node, transformers' Conv1D through the fused node, the
mixed-batch kernels) and on DoRA's reference autograd functions, training runs and its gradients equal the reference
path's, and the same edits under ``no_grad`` and ``inference_mode`` give the reference's outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.kernels import use_reference
from lorakit.kernels.node_output import as_output
from training_helpers import autograd_node_names

D = 16


class Edits(nn.Module):
    """q, k, v read the same x (a shared-input group); q is divided in place, k and v added to in place.
    ``inplace=False`` computes the same with out-of-place ops (the twin whose gradients the edits must not change)."""

    def __init__(self, conv1d: bool = False, inplace: bool = True) -> None:
        super().__init__()
        make = (lambda bias: Conv1D(D, D)) if conv1d else (lambda bias: nn.Linear(D, D, bias=bias))
        self.q, self.k, self.v = make(True), make(True), make(False)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        k = self.k(x)
        v = self.v(x)
        if self.inplace:
            q /= 2.0
            k += q
            v /= 4.0
            v += k
            return v
        q = q / 2.0
        k = k + q
        return v / 4.0 + k


CASES = {
    "lora": dict(),
    "dora": dict(use_dora=True),
    "lora-conv1d": dict(conv1d=True, fan_in_fan_out=True),
}
FAST_NODE = {"lora": "SharedInputLora", "dora": "FusedDoraLinear", "lora-conv1d": "SharedInputLora"}


def _model(case: str, inplace: bool = True, seed: int = 0, **extra):
    settings = dict(CASES[case], **extra)
    conv1d = settings.pop("conv1d", False)
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(target_modules=["q", "k", "v"], r=4, lora_alpha=8, init_lora_weights=False, **settings)
    model = lorakit.get_peft_model(Edits(conv1d, inplace), config).train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # away from init: m != ||W + s B A||
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _step(model, x: torch.Tensor, reference: bool = False):
    """(output, autograd node names, {param: grad}, dL/dx) of one step with a per-element weighted loss."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_reference(reference):
        model(x)  # a first call: shared-input groups are learned from the previous call of the model
        out = model(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    loss = (out * weights).sum() + out.pow(2).mean()
    names = autograd_node_names(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), names, grads, x.grad


def _assert_same(got, want, tol=1e-5):
    out, _, grads, dx = got
    ref_out, _, ref_grads, ref_dx = want
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(dx, ref_dx, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=tol, rtol=tol, msg=name)


X = torch.randn(4, 3, D, generator=torch.Generator().manual_seed(7))  # (batch, tokens, D): the fused nodes flatten it


@pytest.mark.parametrize("case", list(CASES))
def test_training_with_inplace_edits_matches_the_reference_path(case):
    fast = _step(_model(case), X)
    assert any(FAST_NODE[case] in n for n in fast[1]), fast[1]  # the fast path did run
    _assert_same(fast, _step(_model(case), X, reference=True))
    _assert_same(fast, _step(_model(case, inplace=False), X))  # and the edits change no gradient


ALONE = [("lora", "linear"), ("dora", "linear"), ("lora", "conv1d")]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
@pytest.mark.parametrize("method,base", ALONE, ids=["-".join(c) for c in ALONE])
def test_fused_node_alone(method, base, shape, bias):
    """The issue's minimal model: one projection, y /= 2 and y += x in place, against the reference path."""
    if base == "conv1d" and not bias:
        pytest.skip("transformers' Conv1D always has a bias")
    results = []
    for reference in (False, True):
        torch.manual_seed(0)
        layer = Conv1D(8, 8) if base == "conv1d" else nn.Linear(8, 8, bias=bias)
        config = lorakit.LoraConfig(
            target_modules=["0"], init_lora_weights=False, use_dora=method == "dora", fan_in_fan_out=base == "conv1d"
        )
        model = lorakit.get_peft_model(nn.Sequential(layer), config).train()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with use_reference(reference):
            y = model(x)
        node = type(y.grad_fn).__name__
        y /= 2.0
        y += x
        (y * torch.arange(float(y.numel())).reshape(y.shape)).sum().backward()
        results.append((node, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (node, dx, grads), (ref_node, ref_dx, ref_grads) = results
    assert node == ("FusedDoraLinearBackward" if method == "dora" else "FusedLoraLinearBackward")
    assert not ref_node.startswith("Fused")
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-5, msg=name)


def test_lora_with_dropout_edits_change_no_gradient():
    """Dropout > 0 takes the fused node alone (no group); the same seed gives the same mask with and without edits."""
    got = []
    for inplace in (True, False):
        model = _model("lora", inplace, lora_dropout=0.25)
        torch.manual_seed(3)
        got.append(_step(model, X))
    assert "FusedLoraLinearBackward" in got[0][1]
    _assert_same(*got)


@pytest.mark.parametrize("case", ["dora", "lora"])
def test_checkpointing_with_inplace_edits(case):
    """Under non-reentrant checkpointing (saved-tensor hooks) the kept output goes through the hooks."""

    def run(use_checkpoint: bool):
        model = _model(case)
        x = X.clone().requires_grad_(True)
        out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (out, dx, grads), (ref_out, ref_dx, ref_grads) = run(True), run(False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


@pytest.mark.parametrize("reference", [False, True], ids=["fused", "reference"])
def test_dora_second_backward_after_an_edit(reference):
    """retain_graph: the kept output is released by the first backward; the second forms y again, same grads."""
    model = _model("dora")
    x = X.clone().requires_grad_(True)
    with use_reference(reference):
        out = model(x)
    loss = out.pow(2).sum()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss.backward()
    for name, grad in first.items():
        assert "magnitude" not in name or grad.abs().sum() > 0
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("case", list(CASES))
def test_inference_with_inplace_edits(case, mode):
    model = _model(case).eval()
    if mode == "frozen":  # grad mode on, nothing to train but the input
        model.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    outs = []
    for reference in (False, True):
        x = X.clone().requires_grad_(mode == "frozen")
        with context(), use_reference(reference):
            model(x)
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    if mode == "frozen":
        outs[0].sum().backward()  # the edits stay differentiable with respect to the input


def _mixed_model():
    model = _model("lora").eval()
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["q", "v"], r=2, init_lora_weights=False))
    return model


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_mixed_batch_with_inplace_edits(mode):
    model = _mixed_model()
    if mode == "frozen":
        model.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    names = ["other", "default", "__base__", "other"]
    outs = []
    for reference in (False, True):
        x = X.clone().requires_grad_(mode == "frozen")
        with context(), use_reference(reference):
            outs.append(model(x, adapter_names=names))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    model.base_model.set_adapter("other")
    with torch.no_grad(), use_reference():
        alone = model(X[:1])
    torch.testing.assert_close(outs[0][:1], alone, atol=1e-5, rtol=1e-5)
    if mode == "frozen":
        outs[0].sum().backward()


class ConvEmbed(nn.Module):
    """DoRA's other reference function (``DoraScaleFunction``): a conv and an embedding output edited in place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 5, 3, bias=False)
        self.inplace = inplace

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)  # (B, T, 6)
        if self.inplace:
            e /= 2.0
        else:
            e = e / 2.0
        c = self.conv(e.transpose(1, 2))  # (B, 5, T - 2)
        if self.inplace:
            c += 1.0
            return c
        return c + 1.0


def test_dora_conv_and_embedding_with_inplace_edits():
    results = []
    for inplace in (True, False):
        torch.manual_seed(0)
        config = lorakit.LoraConfig(target_modules=["emb", "conv"], r=2, init_lora_weights=False, use_dora=True)
        model = lorakit.get_peft_model(ConvEmbed(inplace), config).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        ids = torch.randint(0, 10, (3, 7), generator=torch.Generator().manual_seed(2))
        out = model(ids)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    edited, plain = results
    assert sum("magnitude" in n for n in edited) == 2
    for name, grad in edited.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_as_output_reshapes_in_place_without_a_view():
    out = torch.arange(24.0).reshape(6, 4).clone()  # a fresh tensor, as the nodes make
    got = as_output(out, torch.Size([2, 3]))
    assert got is out and got.shape == (2, 3, 4) and not got._is_view()
    torch.testing.assert_close(got, torch.arange(24.0).reshape(2, 3, 4))
    transposed = torch.arange(24.0).reshape(4, 6).t()  # (6, 4), not row-major: its values must survive too
    want = transposed.reshape(3, 2, 4)
    got = as_output(transposed, torch.Size([3, 2]))
    assert not got._is_view()
    torch.testing.assert_close(got, want)


ISSUE_MODELS = [("led", False), ("led", True), ("roc_bert", False), ("roc_bert", True), ("falcon", True)]
TINY = dict(
    hidden_size=32, num_hidden_layers=2, intermediate_size=37, num_attention_heads=4, d_model=32, vocab_size=99,
    encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
    decoder_ffn_dim=32, attention_window=[4], max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
    pronunciation_vocab_size=20, shape_vocab_size=20, num_kv_heads=4, dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_dropout=0.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "model_type,dora", ISSUE_MODELS, ids=[f"{t}-{'lora' if not d else 'dora'}" for t, d in ISSUE_MODELS]
)
def test_issue_architectures_train_as_peft(model_type, dora):
    """The architectures the issue saw crash (their code edits projection outputs in place): a training step's
    gradients equal peft's on the same weights (all-linear, train mode, dropout off)."""
    import peft
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, **({"decoder_input_ids": ids} if model_type == "led" else {}))
    grads: list[dict] = []
    source: dict = {}
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        config_cls = lib.LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=dora)
        model = lib.get_peft_model(AutoModel.from_config(config), config_cls).train()
        if grads:  # peft's adapter weights, by their shared names
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.requires_grad:
                        param.copy_(source[name])
        source = source or dict(model.named_parameters())
        out = model(**inputs).last_hidden_state
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, want in grads[0].items():
        err = ((grads[1][name] - want).norm() / want.norm()).item()
        assert err < 1e-5, (name, err, want.abs().max().item())
