"""LoRA-FA (arXiv:2308.03303): A frozen, B's gradient projected to (1/s^2) g_B (A A^T + 1e-8 I)^-1, then adamw_hf.
Parity with peft's create_lorafa_optimizer on identical weights, per-layer scaling, and clear errors."""

from __future__ import annotations

import copy

import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch
from opt_cases import assert_same_parameters, pair, train

import lorakit
from lorakit.optimizers import LoraFAOptimizer, create_lorafa_optimizer
from lorakit.optimizers.lorafa import FrozenAFactor
from models import MLP

CASES = {
    # per-layer ranks and alphas (the projection uses each layer's own scaling), rsLoRA, a modules_to_save copy
    "llama": dict(
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
        modules_to_save=["lm_head"],
        r=4,
        lora_alpha=8,
    ),
    "mlp": dict(target_modules=["lin0", "lin1"], r=3, lora_alpha=6),
}


@pytest.fixture
def peft_in_float32(monkeypatch):
    """peft computes the projected gradient under bf16 autocast whenever bf16 is available (always on CPU); the
    float32 reference is its code path without that autocast."""
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)


def _both(kind: str, weight_decay: float = 0.0):
    ours, ref = pair(kind, **CASES[kind])
    cfg = CASES[kind]
    args = dict(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lr=2e-3, weight_decay=weight_decay)
    return ours, ref, create_lorafa_optimizer(ours, **args), peft_lorafa.create_lorafa_optimizer(ref, **args)


@pytest.mark.parametrize("kind", list(CASES))
def test_param_groups_and_frozen_factors_match_peft(kind):
    ours, ref, opt, ref_opt = _both(kind, weight_decay=0.01)
    (group,), (ref_group,) = opt.param_groups, ref_opt.param_groups
    for key in ("lr", "betas", "eps", "weight_decay", "correct_bias"):
        assert group[key] == ref_group[key], key
    assert group["names"] == ref_group["names"]  # every parameter, frozen ones too: checkpoints line up by index
    assert group["scaling_factors"] == pytest.approx(ref_group["scaling_factors"])
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad
    }
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_steps_match_peft(kind, weight_decay, peft_in_float32):
    ours, ref, opt, ref_opt = _both(kind, weight_decay)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    train(ours, opt, kind, steps=3)
    train(ref, ref_opt, kind, steps=3)
    assert_same_parameters(ours, ref, atol=1e-6)
    moved = {n for n, p in ours.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {n for n, p in ours.named_parameters() if p.requires_grad}  # A and the base never move
    assert any("lora_B" in n for n in moved)


def test_peft_default_bf16_projection_stays_close(kind="mlp"):
    """Without the patch peft rounds the projected gradient to bf16; the two trajectories stay within its error."""
    ours, ref, opt, ref_opt = _both(kind)
    train(ours, opt, kind, steps=3)
    train(ref, ref_opt, kind, steps=3)
    assert_same_parameters(ours, ref, atol=2e-4)


def test_projection_formula():
    """The projected gradient equals (1/s^2) g_B (A A^T + 1e-8 I)^-1 for a layer with its own scaling."""
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=3, lora_alpha=9))
    layer = model.base_model.model.lin0
    grad = torch.randn(20, 3, generator=torch.Generator().manual_seed(3))
    a = layer.lora_A["default"].weight.detach()
    expected = grad @ torch.linalg.inv(a @ a.T + 1e-8 * torch.eye(3)) / 3.0**2
    torch.testing.assert_close(FrozenAFactor(layer, "default").project(grad), expected, rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    ours, _ = pair("mlp", **CASES["mlp"])
    twin, _ = pair("mlp", **CASES["mlp"])
    opt, twin_opt = (create_lorafa_optimizer(m, r=3, lora_alpha=6, lr=1e-3) for m in (ours, twin))
    train(ours, opt, "mlp", steps=2)
    twin.load_state_dict(ours.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares state tensors otherwise
    train(ours, opt, "mlp", steps=1)
    train(twin, twin_opt, "mlp", steps=1)
    assert_same_parameters(ours, twin, atol=0)


def test_errors():
    with pytest.raises(ValueError, match=r"no trainable LoRA B factor in MLP \(5 trainable"):
        create_lorafa_optimizer(MLP(), r=4, lora_alpha=8, lr=1e-3)
    ours, _ = pair("mlp", **CASES["mlp"])
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        create_lorafa_optimizer(ours, r=0, lora_alpha=8, lr=1e-3)
    with pytest.raises(ValueError, match="lr and weight_decay must be >= 0"):
        create_lorafa_optimizer(ours, r=3, lora_alpha=6, lr=-1.0)
    with pytest.raises(ValueError, match=r"use_rslora=True .* active adapters \['default'\]"):
        create_lorafa_optimizer(ours, r=3, lora_alpha=6, lr=1e-3, use_rslora=True)
    with pytest.warns(FutureWarning, match="deprecated"):
        create_lorafa_optimizer(ours, r=3, lora_alpha=6, lr=1e-3, use_rslora=False)
    with pytest.warns(UserWarning, match=r"got r=8, lora_alpha=16, but adapter 'default' has r=3, lora_alpha=6"):
        create_lorafa_optimizer(ours, r=8, lora_alpha=16, lr=1e-3)
    with pytest.raises(ValueError, match="Invalid betas"):
        LoraFAOptimizer(ours.parameters(), betas=(1.0, 0.9))


def test_grouped_conv_is_rejected():
    from models import ConvNet

    model = lorakit.get_peft_model(ConvNet(), lorakit.LoraConfig(target_modules=["conv2d", "grouped"], r=2))
    with pytest.raises(ValueError, match=r"grouped conv \(groups=2\)"):
        create_lorafa_optimizer(model, r=2, lora_alpha=8, lr=1e-3)


def test_embedding_adapter_matches_peft(peft_in_float32):
    """Embedding LoRA: delta = B A with A (r, num_embeddings). peft leaves lora_embedding_A requiring grad but never
    updates it; lorakit freezes it. The trajectories agree."""
    ours, ref = pair("emb", target_modules=["emb", "lin"], r=3, lora_alpha=6)
    opt = create_lorafa_optimizer(ours, r=3, lora_alpha=6, lr=2e-3)
    ref_opt = peft_lorafa.create_lorafa_optimizer(ref, r=3, lora_alpha=6, lr=2e-3)
    a0 = ours.base_model.model.emb.lora_embedding_A["default"].detach().clone()
    train(ours, opt, "emb", steps=3)
    train(ref, ref_opt, "emb", steps=3)
    assert_same_parameters(ours, ref, atol=1e-6)
    assert not ours.base_model.model.emb.lora_embedding_A["default"].requires_grad
    assert torch.equal(ours.base_model.model.emb.lora_embedding_A["default"], a0)


def test_every_trainable_adapter_is_projected_with_its_own_factors():
    """Two active adapters (peft pairs parameters by name order and would pair A_default with A_other): each B maps
    to its own layer and adapter; lora_B's bias and the A factors are not projected."""
    config = dict(target_modules=["lin0", "lin1"], r=3, lora_alpha=6, init_lora_weights=False)
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(**config))
    model.add_adapter("other", lorakit.LoraConfig(**{**config, "r": 2, "lora_bias": True}))
    model.base_model.set_adapter(["default", "other"])
    opt = create_lorafa_optimizer(model, r=3, lora_alpha=6, lr=1e-3)
    layers = [model.base_model.model.lin0, model.base_model.model.lin1]
    expected = {id(layer.lora_B[name].weight): (layer, name) for layer in layers for name in ("default", "other")}
    assert {id(b): (f.layer, f.adapter) for b, f in opt.frozen_a.items()} == expected
    model.train()
    model(torch.randn(4, 10)).sum().backward()
    opt.step()  # shapes (r = 3 and r = 2) would not fit if the pairs were mixed up
    assert all(layer.lora_B["other"].bias.requires_grad for layer in layers)


@pytest.mark.parametrize("kind", list(CASES))
def test_optimizer_checkpoints_interchange_with_peft(kind, peft_in_float32):
    """State and group keys are PEFT's (``<module>.lora`` -> step, exp_avg_B, exp_avg_sq_B): a peft optimizer
    checkpoint resumes in lorakit and the other way round, with the same next step."""
    ours, ref, opt, ref_opt = _both(kind)
    train(ours, opt, kind, steps=2)
    train(ref, ref_opt, kind, steps=2)
    ours_sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert {k: sorted(v) for k, v in ours_sd["state"].items()} == {k: sorted(v) for k, v in ref_sd["state"].items()}
    assert "base_model.model.lin0.lora" in ours_sd["state"] or kind != "mlp"
    assert set(ours_sd["param_groups"][0]) | {"scaling_factor"} == set(ref_sd["param_groups"][0])
    # swap the optimizer states: each library continues from the other's checkpoint
    opt.load_state_dict(copy.deepcopy(ref_sd))
    ref_opt.load_state_dict(copy.deepcopy(ours_sd))
    train(ours, opt, kind, steps=1)
    train(ref, ref_opt, kind, steps=1)
    assert_same_parameters(ours, ref, atol=1e-6)
