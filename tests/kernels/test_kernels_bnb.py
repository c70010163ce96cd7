"""The quantised fused node (``kernels/quantised_linear.py``) on bitsandbytes' 4-bit and 8-bit linears (CPU backend):
outputs and every gradient equal the reference (bitsandbytes' autograd base plus the low-rank term), alone and for a
shared-input group; a QLoRA model takes it for every adapted projection (q/k/v and gate/up as one node each) and
trains exactly as the reference path and peft on the same weights; cases it cannot cover fall back."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402

import lorakit  # noqa: E402
from bnb_helpers import DEVICE, assert_same_training_step, load_quantised, lora_state, save_llama64, token_ids  # noqa: E402
from lorakit.kernels.quantised_linear import (  # noqa: E402
    quantised_lora,
    quantised_lora_inference,
    reference_quantised_lora,
)
from lorakit.layers.bnb_products import Bnb4bitBase, Bnb8bitBase  # noqa: E402
from training_helpers import autograd_node_names  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SPECS = [(96, 4, 2.0), (64, 2, 0.5), (128, 8, 1.0)]  # (out, r, scaling): q/k/v-like members of different widths


def _quantised(bits: str, out: int, seed: int, compute: torch.dtype = torch.float32) -> torch.nn.Module:
    """A bitsandbytes linear (64 -> out, with bias) quantised on ``DEVICE`` from a seeded nn.Linear; ``bits``:
    "4bit" (nf4, nested statistics as bitsandbytes' default), "fp4" or "8bit"."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(64, out)
    dense.bias.data.mul_(10)  # a bias that matters
    if bits in ("4bit", "fp4"):
        quant_type = "nf4" if bits == "4bit" else "fp4"
        module = bnb.nn.Linear4bit(64, out, compute_dtype=compute, quant_type=quant_type)
    else:
        module = bnb.nn.Linear8bitLt(64, out, has_fp16_weights=False)
    module.load_state_dict(dense.state_dict())
    return module.to(DEVICE).train()


def _members(bits: str, compute: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    members = []
    for i, (out, r, scaling) in enumerate(SPECS):
        module = _quantised(bits, out, seed=i, compute=compute)
        base = Bnb8bitBase(module) if bits == "8bit" else Bnb4bitBase(module)
        lora_a = torch.randn(r, 64, generator=g).to(DEVICE).requires_grad_(True)
        lora_b = torch.randn(out, r, generator=g).to(DEVICE).requires_grad_(True)
        members.append((module, base, lora_a, lora_b, scaling))
    return members


def _grads(tensors) -> list[torch.Tensor | None]:
    out = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


CASES = [("4bit", torch.float32), ("4bit", torch.bfloat16), ("fp4", torch.float32), ("8bit", torch.float32)]


@pytest.mark.parametrize(("bits", "compute"), CASES, ids=["nf4", "nf4-bf16-compute", "fp4", "int8"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)], ids=["all-used", "one-unused"])
def test_group_node_equals_reference(bits, compute, x_grad, used):
    """x float32 throughout; with a bf16 compute dtype bitsandbytes casts x for its product and back."""
    members = _members(bits, compute)
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_(x_grad)
    g = torch.Generator().manual_seed(2)
    mix = [torch.randn(2, 40, m[0].out_features, generator=g).to(DEVICE) for m in members]
    leaves = [x] * x_grad + [t for m in members for t in m[2:4]]

    grouped = quantised_lora(x, [m[1:] for m in members])
    assert grouped[0].grad_fn.name() == "QuantisedLoraBackward"
    sum((grouped[i] * mix[i]).sum() for i in used).backward()
    got = _grads(leaves)
    ref = [reference_quantised_lora(x, m[0], *m[2:]) for m in members]
    sum((ref[i] * mix[i]).sum() for i in used).backward()
    want = _grads(leaves)
    for a, b in zip(grouped, ref):
        assert a.shape == b.shape and a._base is None  # (2, 40, out), not a view
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, i
        else:
            assert b.abs().sum() > 0
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=f"gradient {i}")
    unused_b = [m[3] for i, m in enumerate(members) if i not in used]
    assert all(b.grad is None for b in unused_b)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_dropout_uses_one_mask_for_output_and_gradients(bits):
    (module, base, lora_a, lora_b, scaling), *_ = _members(bits)
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_(True)
    p = 0.3
    torch.manual_seed(7)
    _, mask = torch.native_dropout(x.detach(), p, True)  # the mask the node will draw
    torch.manual_seed(7)
    out = quantised_lora(x, [(base, lora_a, lora_b, scaling)], p)[0]
    out.pow(2).sum().backward()
    got = _grads([x, lora_a, lora_b])
    ref = reference_quantised_lora(x, module, lora_a, lora_b, scaling, dropout_mask=mask, p=p)
    ref.pow(2).sum().backward()
    want = _grads([x, lora_a, lora_b])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # gradients of out^2: values in the hundreds
    with pytest.raises(ValueError, match="one mask per layer"):
        quantised_lora(x, [m[1:] for m in _members(bits)], p)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_inference_ops_equal_the_node(bits):
    members = _members(bits)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        node = quantised_lora(x, [m[1:] for m in members])
        plain = quantised_lora_inference(x, [(m[1], m[2].detach(), m[3].detach(), m[4]) for m in members])
    for a, b in zip(node, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    return save_llama64(tmp_path_factory)


def _model(path, bits: str, library=lorakit, dropout: float = 0.0):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout)
    return library.get_peft_model(load_quantised(path, bits), library.LoraConfig(**config)).train()


def _step(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    loss = model(input_ids=ids, labels=ids).loss
    nodes = autograd_node_names(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, nodes


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_model_takes_the_node_and_trains_as_the_reference(llama64_dir, bits):
    ours = _model(llama64_dir, bits)
    ids = token_ids()
    _step(ours, ids)  # the first call learns the shared-input groups
    loss, grads, nodes = _step(ours, ids)
    # per decoder layer: q/k/v, o, gate/up, down -> 4 nodes; bitsandbytes' own autograd never appears
    assert nodes.count("QuantisedLoraBackward") == 4 * 2
    assert not any(n.startswith("MatMul") for n in nodes)
    with lorakit.kernels.use_reference():
        loss_ref, grads_ref, nodes_ref = _step(ours, ids)
    assert "QuantisedLoraBackward" not in nodes_ref and any(n.startswith("MatMul") for n in nodes_ref)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    assert sorted(grads) == sorted(grads_ref) and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    ref = _model(llama64_dir, bits, peft)
    ref.load_state_dict(lora_state(ours), strict=False)
    assert_same_training_step(ours, ref, ids)  # and peft's bnb LoRA layers on the same weights
    ours.eval()
    ref.eval()
    with torch.no_grad():  # inference: the node's plain ops (4-bit: bitsandbytes' CPU inference kernel)
        logits = ours(ids).logits
        torch.testing.assert_close(logits, ref(ids).logits, atol=1e-5, rtol=0)
    with torch.inference_mode():  # no version counters: every layer alone, same numbers
        torch.testing.assert_close(ours(ids).logits, logits, atol=1e-6, rtol=0)


def test_dropout_layers_take_the_node_alone_and_train_as_peft(llama64_dir):
    """With dropout each layer draws its own mask: one node per projection, 7 per decoder layer. On CPU the node's
    ``native_dropout`` draws the masks peft's ``nn.Dropout`` draws from the same seed, so the step equals peft's."""
    ours = _model(llama64_dir, "4bit", dropout=0.1)
    ref = _model(llama64_dir, "4bit", peft, dropout=0.1)
    ref.load_state_dict(lora_state(ours), strict=False)
    ids = token_ids()
    _step(ours, ids)
    torch.manual_seed(11)
    loss, grads, nodes = _step(ours, ids)
    assert nodes.count("QuantisedLoraBackward") == 7 * 2
    torch.manual_seed(11)
    loss_ref, grads_ref, _ = _step(ref, ids)
    torch.manual_seed(12)
    loss_other, _, _ = _step(ours, ids)
    assert abs(loss_other - loss) > 1e-4  # the masks matter: another seed gives another loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    assert sorted(grads) == sorted(grads_ref)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_hooked_base_and_eval_mode_input_gradients_fall_back(llama64_dir):
    ours = _model(llama64_dir, "4bit")
    ids = token_ids()
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    calls = []
    handle = layer.get_base_layer().register_forward_hook(lambda *args: calls.append(1))
    _, _, nodes = _step(ours, ids)
    assert calls and nodes.count("QuantisedLoraBackward") == 7 * 2 - 1  # down_proj of layer 1 on the reference path
    handle.remove()
    ours.eval()  # 4-bit on CPU in eval mode may repack for inference: x's gradient needs the reference path
    x = torch.randn(2, 5, layer.in_features, device=DEVICE, requires_grad=True)
    out = layer(x)
    assert out.grad_fn.name() != "QuantisedLoraBackward"
    with lorakit.kernels.use_reference():
        torch.testing.assert_close(out, layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_trains_as_the_reference(llama64_dir, reentrant, monkeypatch):
    """The node is recomputed inside checkpointed blocks (one node per layer: groups are off under saved-tensor
    hooks); loss and gradients equal the reference path's."""
    from lorakit.kernels import quantised_linear

    calls = []
    outputs = quantised_linear._outputs
    monkeypatch.setattr(quantised_linear, "_outputs", lambda *a: calls.append(1) or outputs(*a))
    ours = _model(llama64_dir, "4bit")
    base = ours.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        base.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    ids = token_ids()
    _step(ours, ids)
    calls.clear()
    loss, grads, nodes = _step(ours, ids)
    assert len(calls) >= 7 * 2  # every adapted projection, in the forward and in the recomputation
    if not reentrant:
        assert nodes.count("QuantisedLoraBackward") == 7 * 2
    with lorakit.kernels.use_reference():
        loss_ref, grads_ref, _ = _step(ours, ids)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    assert len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
