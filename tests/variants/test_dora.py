"""DoRA (arXiv:2402.09353): parity with peft on every layer type, merging, init, training, offload, precision."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
from dora_cases import LAYER_CASES, build, inputs, perturb, scalar_loss
from safetensors.torch import load_file

import lorakit
from lorakit.variants.dora_autograd import DoraLinearFunction, DoraScaleFunction
from lorakit.variants.dora_norm import weight_norm, weight_norm_reference
from models import output_tensor

CASE_IDS = list(LAYER_CASES)


def _pair(case: str, **kwargs):
    """(lorakit model, peft model) with the same DoRA config; ours holds peft's (perturbed) weights."""
    kind, targets = LAYER_CASES[case]
    cfg = dict(target_modules=targets, r=4, lora_alpha=8, use_dora=True, **kwargs)
    ref = peft.get_peft_model(build(kind), peft.LoraConfig(**cfg))
    perturb(ref)
    ours = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(**cfg))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _logits(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs(kind)))


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, lorakit.layers.LoraLayer)]


def _record_linear_nodes(model) -> dict[str, str]:
    """{layer name: its output's autograd node type}, filled as the model runs, for LoRA layers on nn.Linear."""
    nodes: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, lorakit.layers.LoraLayer) and type(module.get_base_layer()) is nn.Linear:
            module.register_forward_hook(
                lambda mod, args, out, name=name: nodes.__setitem__(name, type(out.grad_fn).__name__)
            )
    return nodes


# ---------------------------------------------------------------------- parity with peft
@pytest.mark.parametrize("case", CASE_IDS)
def test_forward_and_gradients_match_peft(case):
    """Train mode, dropout 0: outputs and the gradients of magnitude, A and B agree with peft's in float32."""
    ours, ref = _pair(case)
    kind = LAYER_CASES[case][0]
    ours.train()
    ref.train()
    nodes = _record_linear_nodes(ours)
    out_ours = output_tensor(ours(**inputs(kind)))
    out_ref = output_tensor(ref(**inputs(kind)))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-5)
    if case in ("linear", "llama"):  # plain nn.Linear layers take the fused DoRA node (kernels/dora_linear.py)
        assert nodes and set(nodes.values()) == {"FusedDoraLinearBackward"}, nodes
    scalar_loss(out_ours).backward()
    scalar_loss(out_ref).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(ref_grads)
    assert any("lora_magnitude_vector" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        assert grad is not None, name
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["linear", "conv1d_transformers", "conv"])
def test_dropout_path_matches_peft_with_a_fixed_mask(case):
    """With active dropout W x' is recomputed instead of read off the base output; same math as peft."""

    class FixedMask(nn.Module):  # a deterministic "dropout" (not nn.Identity, so the dropout path runs)
        def forward(self, x):
            mask = (torch.arange(x.shape[-1]) % 3 != 0).to(x.dtype)
            return x * mask * 1.5

    kind = LAYER_CASES[case][0]
    ours, ref = _pair(case, lora_dropout=0.1)
    for model in (ours, ref):
        model.train()
        for module in model.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = FixedMask()
    out_ours, out_ref = output_tensor(ours(**inputs(kind))), output_tensor(ref(**inputs(kind)))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-5)
    scalar_loss(out_ours).backward()
    scalar_loss(out_ref).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            scale = max(1.0, ref_grads[name].grad.abs().max().item())
            torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_two_active_dora_adapters_match_peft():
    kind, targets = LAYER_CASES["linear"]
    outs = []
    for lib in (peft, lorakit):
        torch.manual_seed(3)
        model = lib.get_peft_model(build(kind), lib.LoraConfig(target_modules=targets, r=4, use_dora=True))
        model.add_adapter("second", lib.LoraConfig(target_modules=["lin0", "head"], r=2, use_dora=True))
        if lib is peft:
            perturb(model, seed=5)
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        model.base_model.set_adapter(["default", "second"])
        outs.append(_logits(model, kind))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["linear", "conv1d_transformers", "embedding", "conv", "llama"])
def test_peft_saved_adapter_loads_with_identical_logits_and_back(case, tmp_path):
    _, ref = _pair(case)
    kind = LAYER_CASES[case][0]
    expected = _logits(ref, kind)
    ref.save_pretrained(tmp_path / "peft")
    loaded = lorakit.PeftModel.from_pretrained(build(kind), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, kind), expected, atol=1e-5, rtol=1e-5)

    loaded.save_pretrained(tmp_path / "ours")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours_file) == set(peft_file)
    assert any(k.endswith(".lora_magnitude_vector") for k in ours_file)
    for key, tensor in peft_file.items():
        torch.testing.assert_close(ours_file[key], tensor, atol=0, rtol=0)
    back = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, kind), expected, atol=1e-5, rtol=1e-5)


def test_scaled_embedding_scales_the_adapter_term_as_peft():
    """Embeddings that scale their output (Gemma's embed_scale) scale DoRA's adapter term too; the norm is not."""

    class ScaledEmbedding(nn.Embedding):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = ScaledEmbedding(50, 12)

        def forward(self, ids):
            return self.emb(ids)

    cfg = dict(target_modules=["emb"], r=4, use_dora=True)
    ref = peft.get_peft_model(Net(), peft.LoraConfig(**cfg))
    perturb(ref)
    ours = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**cfg))
    ours.load_state_dict(ref.state_dict())
    ids = inputs("emb")["ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_magnitude_shapes_are_peft_shapes():
    ours, ref = _pair("conv")
    ours_e, ref_e = _pair("embedding")
    ours_l, ref_l = _pair("conv1d_transformers")
    for a, b in ((ours, ref), (ours_e, ref_e), (ours_l, ref_l)):
        ref_shapes = {k: v.shape for k, v in b.state_dict().items() if "magnitude" in k}
        assert ref_shapes
        assert {k: v.shape for k, v in a.state_dict().items() if "magnitude" in k} == ref_shapes
    shapes = {k.split(".")[2]: tuple(v.shape) for k, v in ours.state_dict().items() if "magnitude" in k}
    assert shapes == {"conv1d": (1, 6, 1), "conv2d": (1, 8, 1, 1), "conv3d": (1, 4, 1, 1, 1)}


# ---------------------------------------------------------------------- init, merge, training
@pytest.mark.parametrize("case", CASE_IDS)
def test_noop_at_init_and_magnitude_is_the_column_norm(case):
    kind, targets = LAYER_CASES[case]
    base_out = _logits(build(kind), kind)
    model = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    torch.testing.assert_close(_logits(model, kind), base_out, atol=1e-6, rtol=0)
    for layer in _lora_layers(model):
        weight = layer._weight_to_2d(layer.get_base_layer().weight.detach())
        magnitude = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(magnitude.reshape(-1), weight.norm(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASE_IDS)
def test_merged_equals_unmerged_and_unmerge_restores_the_weights(case):
    ours, _ = _pair(case)
    kind = LAYER_CASES[case][0]
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    expected = _logits(ours, kind)
    ours.base_model.merge_adapter()
    torch.testing.assert_close(_logits(ours, kind), expected, atol=1e-5, rtol=1e-4)
    ours.base_model.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(_logits(ours, kind), expected, atol=1e-6, rtol=1e-6)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(_logits(merged, kind), expected, atol=1e-5, rtol=1e-4)


def test_merging_two_dora_adapters_matches_peft():
    """The second merge divides by the norm of the unmerged base weight, as peft does."""
    kind, targets = LAYER_CASES["linear"]
    weights = []
    for lib in (peft, lorakit):
        model = lib.get_peft_model(build(kind), lib.LoraConfig(target_modules=targets, r=4, use_dora=True))
        model.add_adapter("second", lib.LoraConfig(target_modules=targets, r=2, use_dora=True))
        if lib is peft:
            perturb(model, seed=7)
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        model.base_model.merge_adapter(["default", "second"])
        weights.append(model.base_model.model.lin0.base_layer.weight.detach().clone())
        model.base_model.unmerge_adapter()
        original = build(kind).lin0.weight
        torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight, original, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)


def test_bfloat16_merge_round_trip_is_exact_to_rounding():
    model = lorakit.get_peft_model(
        build("mlp").to(torch.bfloat16), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_dora=True)
    )
    perturb(model)
    layer = model.base_model.model.lin1
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=0.02, rtol=0.02)


def test_training_changes_the_loss_and_the_magnitude():
    kind, targets = LAYER_CASES["llama"]
    model = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    model.train()
    batch = inputs(kind)
    magnitude = model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    start = magnitude.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    assert not torch.allclose(magnitude, start)


# ---------------------------------------------------------------------- the fast pieces against references
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_fast_norm_matches_reference(dtype, transposed):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=g)
    weight = (weight.T.contiguous().T if transposed else weight).to(dtype)
    lora_a, lora_b = torch.randn(6, 40, generator=g), torch.randn(48, 6, generator=g) * 0.1
    fast = weight_norm(weight, lora_a, lora_b, 0.7)
    ref = weight_norm_reference(weight, lora_a, lora_b, 0.7)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fast, ref, atol=0, rtol=tol)
    torch.testing.assert_close(weight_norm(weight, lora_a, lora_b * 0, 0.7), weight.float().norm(dim=1))


def _dora_reference(x, weight, bias, lora_a, lora_b, magnitude, scaling, x_lora=None):
    """DoRA by autograd on the formula: y = b + (m / ||W + s B A||_detached) (W x + s B A x') (x' = x unless
    given), written as PEFT's base + (k - 1) W x' + k s B A x'."""
    x_lora = x if x_lora is None else x_lora
    norm = (weight + scaling * lora_b @ lora_a).norm(dim=1).detach()
    k = magnitude / norm
    result = nn.functional.linear(x, weight, bias)
    return result + (k - 1) * nn.functional.linear(x_lora, weight) + k * scaling * (x_lora @ lora_a.T @ lora_b.T)


@pytest.mark.parametrize(("dropout", "with_bias"), [(False, True), (False, False), (True, True)])
def test_linear_function_gradients_match_autograd_in_float64(dropout, with_bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    lora_a = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(5, generator=g, dtype=torch.float64).add(0.5)
    magnitude[1] = 0.0  # a zero magnitude still gets its gradient (its channel outputs only the bias)
    magnitude.requires_grad_()
    mask = (torch.rand(7, generator=g) > 0.3).to(torch.float64) * 1.4

    def ours(x, lora_a, lora_b, magnitude, bias):
        norm = weight_norm_reference(weight, lora_a, lora_b, 0.5)
        result = nn.functional.linear(x, weight, bias)
        if dropout:
            xd = x * mask
            wx = nn.functional.linear(xd, weight)
            return DoraLinearFunction.apply(xd, result, wx, lora_a, lora_b, magnitude, norm, 0.5, None)
        return DoraLinearFunction.apply(x, result, None, lora_a, lora_b, magnitude, norm, 0.5, bias)

    def ref(x, lora_a, lora_b, magnitude, bias):
        return _dora_reference(x, weight, bias, lora_a, lora_b, magnitude, 0.5, x * mask if dropout else None)

    args = (x, lora_a, lora_b, magnitude) + ((bias,) if with_bias else ())
    full = (*args, None) if not with_bias else args
    torch.testing.assert_close(ours(*full), ref(*full))
    cotangent = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref(*full), args, cotangent)
    got = torch.autograd.grad(ours(*full), args, cotangent)
    for name, a, b in zip(("x", "A", "B", "m", "bias"), got, expected):
        torch.testing.assert_close(a, b, msg=name)
    assert got[3][1].abs() > 1e-3


def test_linear_function_keeps_only_x_the_rank_r_product_and_its_output_for_backward():
    """No bias, no dropout, and a way to form the base output again (``again``, for when the caller edits y in
    place): the magnitude's gradient is read off the output, which the next layer keeps anyway."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(48, 32, generator=g)
    lora_a = torch.randn(4, 32, generator=g, requires_grad=True)
    lora_b = torch.randn(48, 4, generator=g, requires_grad=True)
    magnitude = torch.rand(48, generator=g).add(0.5).requires_grad_()
    norm = weight_norm(weight, lora_a, lora_b, 2.0)
    result = x @ weight.T
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        again = lambda x: x @ weight.T  # noqa: E731
        y = DoraLinearFunction.apply(x, result, None, lora_a, lora_b, magnitude, norm, 2.0, None, again)
    known = {t.untyped_storage().data_ptr() for t in (x, y, lora_a, lora_b, norm)}
    extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    extra = {ptr: n for ptr, n in extra.items() if ptr not in known}
    assert sum(extra.values()) <= 64 * 4 * 4 + 48 * 4  # A x (N, r) and k (out,)


@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_function_gradients_match_autograd_with_channel_axis(with_bias):
    g = torch.Generator().manual_seed(2)
    result = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lora = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(1, 4, 1, 1, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    norm = torch.rand(1, 4, 1, 1, generator=g, dtype=torch.float64).add(0.5)

    def ref(result, lora, magnitude, bias=None):
        k = magnitude / norm
        base = result if bias is None else result - bias
        return result + (k - 1) * base + k * lora

    args = (result, lora, magnitude) + ((bias,) if with_bias else ())
    got = DoraScaleFunction.apply(result, None, lora, magnitude, norm, bias if with_bias else None)
    torch.testing.assert_close(got, ref(*args))
    cotangent = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, args, cotangent), torch.autograd.grad(ref(*args), args, cotangent)):
        torch.testing.assert_close(a, b)


def test_bfloat16_keeps_the_magnitude_precise_near_one():
    """k = m / n within half a bfloat16 ulp of 1 must still scale the output: the output is rounded once from
    float32 (rounding z first and then scaling would give back z for almost every element)."""
    model = lorakit.get_peft_model(
        build("mlp").to(torch.bfloat16), lorakit.LoraConfig(target_modules=["lin1"], r=4, use_dora=True)
    )
    perturb(model, scale=0.05)
    layer = model.base_model.model.lin1
    x = torch.randn(256, 20).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x).float()
        layer.lora_magnitude_vector["default"].weight.mul_(1.0015)
        after = layer(x).float()
    ratio = (after * before).sum() / (before * before).sum()
    assert abs(ratio.item() - 1.0015) < 3e-4


@pytest.mark.parametrize("factor", [0.01, 1.0, 30.0])
def test_bfloat16_output_is_accurate_for_any_magnitude(factor):
    """y = b + k z is rounded once from float32 for small and large k alike (forming it as result + D with a
    rounded D = (k - 1) W x + ... would cancel for k << 1)."""
    model = lorakit.get_peft_model(
        build("mlp").to(torch.bfloat16), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_dora=True)
    )
    perturb(model, scale=0.05)
    x = torch.randn(128, 10).to(torch.bfloat16)
    for name in ("lin0", "lin1"):
        layer = model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(factor)
            h = x if name == "lin0" else torch.randn(128, 20).to(torch.bfloat16)
            out = layer(h).double()
            w, a, b = (t.detach().double() for t in (layer.base_layer.weight, *layer._factors("default")))
            s = layer.adapters["default"].scaling
            k = layer.lora_magnitude_vector["default"].weight.double() / (w + s * b @ a).norm(dim=1)
            bias = 0 if layer.base_layer.bias is None else layer.base_layer.bias.double()
            expected = bias + k * (h.double() @ (w + s * b @ a).T)
        assert ((out - expected).norm() / expected.norm()).item() < 5e-3, name


def test_bfloat16_training_step_is_close_to_float32():
    torch.manual_seed(0)
    kind, targets = LAYER_CASES["llama"]
    cfg = lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True)
    fp32 = lorakit.get_peft_model(build(kind), cfg)
    perturb(fp32)
    bf16 = lorakit.get_peft_model(build(kind).to(torch.bfloat16), lorakit.LoraConfig(**cfg.to_dict()))
    bf16.load_state_dict(fp32.state_dict())
    batch = inputs(kind)
    for model in (fp32, bf16):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    grads = {m: dict(m.named_parameters())[name].grad for m in (fp32, bf16)}
    assert grads[bf16].dtype == torch.float32  # adapters stay float32 on a bfloat16 base
    cos = nn.functional.cosine_similarity(grads[fp32], grads[bf16], dim=0)
    assert cos > 0.99


def test_autocast_forward_and_backward_run():
    kind, targets = LAYER_CASES["linear"]
    model = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    perturb(model)
    model.train()
    x = inputs(kind)["x"]
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- runtime settings and errors
def test_ephemeral_gpu_offload_on_cpu_changes_nothing(tmp_path):
    kind, targets = LAYER_CASES["conv1d_transformers"]
    plain = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    perturb(plain)
    plain.save_pretrained(tmp_path)
    cfg = lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True)
    cfg.runtime_config.ephemeral_gpu_offload = True
    fresh = lorakit.get_peft_model(build(kind), cfg)
    reference = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    reference.load_state_dict(fresh.state_dict())  # same A, B: the magnitudes must agree
    for a, b in zip(_lora_layers(fresh), _lora_layers(reference)):
        assert a.adapters["default"].variant.ephemeral_gpu_offload
        b.adapters["default"].variant.init(b, "default")
        torch.testing.assert_close(a.lora_magnitude_vector["default"].weight, b.lora_magnitude_vector["default"].weight)
    loaded = lorakit.PeftModel.from_pretrained(build(kind), tmp_path, ephemeral_gpu_offload=True)
    assert loaded.peft_config["default"].runtime_config.ephemeral_gpu_offload
    torch.testing.assert_close(_logits(loaded, kind), _logits(plain, kind))
    loaded.base_model.merge_adapter()
    torch.testing.assert_close(_logits(loaded, kind), _logits(plain, kind), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ephemeral_gpu_offload_computes_on_the_gpu_and_returns_to_cpu(monkeypatch):
    from lorakit.variants import dora

    seen = []
    original = dora.weight_norm

    def spy(weight, *args):
        seen.append(weight.device.type)
        return original(weight, *args)

    monkeypatch.setattr(dora, "weight_norm", spy)
    cfg = lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_dora=True)
    cfg.runtime_config.ephemeral_gpu_offload = True
    model = lorakit.get_peft_model(build("mlp"), cfg)
    assert seen and set(seen) == {"cuda"}
    magnitude = model.base_model.model.lin0.lora_magnitude_vector["default"].weight
    assert magnitude.device.type == "cpu"
    torch.testing.assert_close(magnitude, model.base_model.model.lin0.base_layer.weight.norm(dim=1))


def test_mixed_batch_with_a_dora_adapter_raises():
    kind, targets = LAYER_CASES["linear"]
    model = lorakit.get_peft_model(build(kind), lorakit.LoraConfig(target_modules=targets, r=4, use_dora=True))
    model.add_adapter("plain", lorakit.LoraConfig(target_modules=targets, r=4))
    model.eval()
    x = inputs(kind)["x"]
    with pytest.raises(ValueError, match="DoRA"):
        model(x=x, adapter_names=["default", "plain", "__base__", "plain"])


def test_grouped_conv_is_refused_by_name():
    with pytest.raises(ValueError, match="groups=2"):
        lorakit.get_peft_model(build("conv"), lorakit.LoraConfig(target_modules=["grouped"], r=2, use_dora=True))


def test_low_cpu_mem_usage_loads_a_dora_adapter(tmp_path):
    _, ref = _pair("llama")
    ref.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(build("llama"), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(_logits(loaded, "llama"), _logits(ref, "llama"), atol=1e-5, rtol=1e-5)
