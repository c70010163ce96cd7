"""add_weighted_adapter: every combination type against peft, exactness of cat/svd, errors, the registry."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from lorakit.delta import delta_matrix
from lorakit.merging import COMBINATIONS, Combination, register_combination
from models import BUILDERS, make_inputs, output_tensor

TYPES = [
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


def _pair(kind="llama", first=None, second=None):
    first = first or dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    second = second or dict(target_modules=["q_proj", "k_proj", "down_proj"], r=4, lora_alpha=6)
    models = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(BUILDERS[kind](), lib.LoraConfig(init_lora_weights=False, **first))
        model.add_adapter("b", lib.LoraConfig(init_lora_weights=False, **second))
        models.append(model.eval())
    models[0].load_state_dict(models[1].state_dict())
    return models


def _out(model, kind="llama"):
    with torch.no_grad():
        return output_tensor(model(**make_inputs(kind)))


def _deterministic_bernoulli(p, *args, **kwargs):
    """A fixed keep-mask (2 of every 3 entries), so that DARE draws the same mask in both libraries."""
    return (torch.arange(p.numel()).reshape(p.shape) % 3 != 0).to(p)


@pytest.mark.parametrize("combination_type", TYPES)
def test_every_combination_type_matches_peft(combination_type, monkeypatch):
    monkeypatch.setattr(torch, "bernoulli", _deterministic_bernoulli)
    ours, ref = _pair()
    for model in (ours, ref):
        model.add_weighted_adapter(
            ["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type, density=0.6, svd_clamp=0.99
        )
        model.set_adapter("mix")
    assert ours.peft_config["mix"].r == ref.peft_config["mix"].r
    torch.testing.assert_close(_out(ours), _out(ref), atol=1e-5, rtol=0)
    for path, layer in ours.base_model.lora_layers():
        ref_layer = ref.base_model.model.get_submodule(path)
        torch.testing.assert_close(
            layer.get_delta_weight("mix"), ref_layer.get_delta_weight("mix"), atol=1e-5, rtol=0, msg=path
        )


@pytest.mark.parametrize(("kind", "targets"), [("llama", ["embed_tokens", "q_proj"]), ("gpt2", ["c_attn", "c_fc"])])
@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties"])
def test_embeddings_and_conv1d_match_peft(kind, targets, combination_type):
    ours, ref = _pair(kind, dict(target_modules=targets, r=4), dict(target_modules=targets[1:], r=4, lora_alpha=2))
    for model in (ours, ref):
        model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type=combination_type, density=0.5)
        model.set_adapter("mix")
    torch.testing.assert_close(_out(ours, kind), _out(ref, kind), atol=1e-5, rtol=0)


def _expected_delta(layer, adapters, weights):
    """sum_i w_i s_i B_i A_i in the (out, in) view."""
    total = 0
    for adapter, weight in zip(adapters, weights):
        if adapter in layer.adapters:
            a, b = layer._factors_2d(adapter)
            total = total + weight * delta_matrix(a, b, layer.adapters[adapter].scaling)
    return total


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_exact_with_mixed_ranks_and_rslora(combination_type, tmp_path):
    ours, _ = _pair(
        "mlp",
        dict(target_modules=["lin0", "lin1"], r=3, use_rslora=True, lora_bias=True),
        dict(target_modules=["lin1", "head"], r=5, lora_alpha=3),
    )
    adapters, weights = ["default", "b"], [0.8, -1.5]
    ours.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type, svd_rank=10)
    for path, layer in ours.base_model.lora_layers():
        assert layer.adapters["mix"].scaling == 1.0
        a, b = layer._factors_2d("mix")
        torch.testing.assert_close(
            delta_matrix(a, b, 1.0), _expected_delta(layer, adapters, weights), atol=1e-5, rtol=0, msg=path
        )
    lin0 = ours.base_model.model.lin0
    torch.testing.assert_close(
        lin0.lora_B["mix"].bias, 0.8 * lin0.adapters["default"].scaling * lin0.lora_B["default"].bias
    )
    # the combined adapter alone gives the weighted sum of the sources' effects
    x = torch.randn(4, 10)
    ours.set_adapter("mix")
    with torch.no_grad():
        mixed = ours(x)
        ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == (8 if combination_type == "cat" else 10)
    assert config["use_rslora"] is False
    reloaded = peft.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), mixed, atol=1e-5, rtol=0)


def test_dare_drops_at_the_given_density_and_rescales():
    ours, _ = _pair()
    ours.add_weighted_adapter(["default", "b"], [1.0, 0.0], "mix", combination_type="dare_linear", density=0.25)
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    source_b = layer.lora_B["default"].weight * layer.adapters["default"].scaling ** 0.5
    merged_b = layer.lora_B["mix"].weight
    kept = merged_b != 0
    assert 0.15 < kept.float().mean() < 0.35
    torch.testing.assert_close(merged_b[kept], source_b[kept] / 0.25)


def test_modules_to_save_copy_is_carried_over_and_conflicts_raise():
    config = dict(target_modules=["lin0"], r=2, init_lora_weights=False, modules_to_save=["head"])
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(**config))
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    model.add_adapter("plain", lorakit.LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix", combination_type="cat")
    head = model.base_model.model.head.modules_to_save
    torch.testing.assert_close(head["mix"].weight, head["default"].weight, atol=0, rtol=0)
    model.add_adapter("other_head", lorakit.LoraConfig(**config))
    with pytest.raises(ValueError, match=r"\['default', 'other_head'\] each have their own copy"):
        model.add_weighted_adapter(["default", "other_head"], [1.0, 1.0], "mix2", combination_type="cat")
    assert "mix2" not in model.peft_config


def test_new_adapter_is_inactive_and_frozen_and_single_source_is_linear():
    ours, _ = _pair()
    ours.train()
    ours.add_weighted_adapter(["b"], [2.0], "twice", combination_type="cat")
    assert ours.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".twice." in n)
    assert ours.peft_config["twice"].r == 4  # linear: the source's rank, not cat's sum
    layer = ours.base_model.model.model.layers[0].self_attn.k_proj
    torch.testing.assert_close(layer.get_delta_weight("twice"), 2 * layer.get_delta_weight("b"), atol=1e-6, rtol=0)


def test_errors_name_the_problem():
    ours, _ = _pair(second=dict(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match=r"Adapter nope does not exist; existing adapters: \['b', 'default'\]"):
        ours.add_weighted_adapter(["default", "nope"], [1, 1], "mix")
    with pytest.raises(ValueError, match=r"'b' already exists"):
        ours.add_weighted_adapter(["default"], [1], "b")
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["default", "b"], [1], "mix")
    with pytest.raises(ValueError, match=r"Unknown combination_type 'average'; available: \['cat', 'dare_linear'"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="average")
    with pytest.raises(ValueError, match=r"'ties' needs density in \[0, 1\], got None"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="ties")
    with pytest.raises(
        ValueError, match=r"'linear' needs adapters of equal rank; \['default', 'b'\] have ranks \[4, 2\]"
    ):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")
    grouped = lorakit.get_peft_model(BUILDERS["conv"](), lorakit.LoraConfig(target_modules=["grouped"], r=2))
    with pytest.raises(ValueError, match="grouped conv 'grouped'"):
        grouped.add_weighted_adapter(["default"], [1.0], "mix")
    assert list(ours.peft_config) == ["default", "b"]
    assert not any(".mix." in k for k in ours.state_dict())


def test_registry_accepts_new_combination_types():
    def first_only(sources, rank, options):
        return sources[0].lora_a * sources[0].scaling * sources[0].weight, sources[0].lora_b

    register_combination("first_only", Combination(first_only, rank="svd"))
    try:
        ours, _ = _pair()
        ours.add_weighted_adapter(["default", "b"], [3.0, 1.0], "mix", combination_type="first_only")
        layer = ours.base_model.model.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(layer.get_delta_weight("mix"), 3 * layer.get_delta_weight("default"))
    finally:
        del COMBINATIONS["first_only"]
