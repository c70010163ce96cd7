"""EVA: rank allocation and A against peft, meta-device adapters, the saved adapter, the batched PCA, bad inputs."""

import peft
import pytest
import torch
from init_helpers import MODELS, logits, token_batches

import lorakit
from lorakit.init.incremental_pca import PcaState, partial_fit_many
from models import BUILDERS, make_inputs


def ours_eva(kind, data, eva=None, targets=None, **kwargs):
    build, default_targets = MODELS[kind]
    config = lorakit.LoraConfig(
        target_modules=targets or default_targets,
        r=4,
        lora_alpha=8,
        init_lora_weights="eva",
        eva_config=eva or lorakit.EvaConfig(tau=0.9),
        **kwargs,
    )
    model = lorakit.get_peft_model(build(), config, low_cpu_mem_usage=True)
    lorakit.initialize_lora_eva_weights(model, data, show_progress_bar=False)
    return model.eval()


def peft_eva(kind, data, eva=None, targets=None):
    build, default_targets = MODELS[kind]
    eva = eva or peft.EvaConfig(tau=0.9)
    config = peft.LoraConfig(
        target_modules=targets or default_targets, r=4, lora_alpha=8, init_lora_weights="eva", eva_config=eva
    )
    model = peft.get_peft_model(build(), config, low_cpu_mem_usage=True)
    peft.initialize_lora_eva_weights(model, data, show_progress_bar=False)
    return model.eval()


def assert_a_matches_up_to_sign(ours, theirs):
    mine, ref = ours.state_dict(), theirs.state_dict()
    keys = [k for k in ref if ".lora_A." in k]
    assert keys and {k for k in mine if ".lora_A." in k} == set(keys)
    for key in keys:
        a, b = mine[key], ref[key]
        assert a.shape == b.shape, key
        sign = torch.sign((a * b).sum(dim=1, keepdim=True))
        torch.testing.assert_close(a, sign * b, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_ranks_and_components_as_peft_and_output_unchanged(kind):
    data = token_batches(8)
    ours, theirs = ours_eva(kind, data), peft_eva(kind, data)
    mine, ref = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == ref.rank_pattern and mine.rank_pattern  # ranks really moved
    assert mine.alpha_pattern == ref.alpha_pattern
    assert_a_matches_up_to_sign(ours, theirs)
    inputs = make_inputs(kind)
    torch.testing.assert_close(logits(ours, inputs), logits(MODELS[kind][0](), inputs), atol=1e-5, rtol=0)


def test_whitened_components_match_peft():
    data = token_batches(6)
    targets = ["o_proj", "down_proj"]  # no shared inputs (peft whitens shared components more than once)
    ours = ours_eva("llama", data, lorakit.EvaConfig(tau=0.9, whiten=True, rho=1.5), targets)
    theirs = peft_eva("llama", data, peft.EvaConfig(tau=0.9, whiten=True, rho=1.5), targets)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert_a_matches_up_to_sign(ours, theirs)


def test_shared_inputs_are_decomposed_once():
    """q/k/v (and gate/up) read the same tensor: they get the same components and one of them the largest rank."""
    model = ours_eva("llama", token_batches(6))
    attn = model.base_model.model.model.layers[0].self_attn
    a_q, a_k, a_v = (getattr(attn, n).lora_A["default"].weight for n in ("q_proj", "k_proj", "v_proj"))
    rows = min(a_q.shape[0], a_k.shape[0], a_v.shape[0])
    torch.testing.assert_close(a_k[:rows], a_q[:rows])
    torch.testing.assert_close(a_v[:rows], a_q[:rows])
    assert a_q.shape[0] == max(a_q.shape[0], a_k.shape[0], a_v.shape[0])


def test_meta_until_initialised_then_a_normal_lora_adapter(tmp_path):
    config = lorakit.LoraConfig(
        target_modules=MODELS["llama"][1], r=4, init_lora_weights="eva", eva_config=lorakit.EvaConfig(tau=0.9)
    )
    model = lorakit.get_peft_model(MODELS["llama"][0](), config, low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" in n)
    lorakit.initialize_lora_eva_weights(model, token_batches(8), show_progress_bar=False)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    budget = 4 * len([n for n, _ in model.base_model.lora_layers()])
    assert sum(layer.r["default"] for _, layer in model.base_model.lora_layers()) == budget
    model.eval()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # pretend to train so the adapter does something
    inputs = make_inputs("llama")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    for loader in (peft.PeftModel, lorakit.PeftModel):
        loaded = loader.from_pretrained(MODELS["llama"][0](), tmp_path)
        torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=0)


def test_rank_zero_layers_lose_their_adapter():
    config = lorakit.LoraConfig(
        target_modules=["q_proj", "o_proj"], r=2, init_lora_weights="eva", eva_config=lorakit.EvaConfig()
    )
    model = lorakit.get_peft_model(MODELS["llama"][0](), config, low_cpu_mem_usage=True)
    names = [n for n, _ in model.base_model.lora_layers()]
    state = {n: torch.randn(4, 32) for n in names}
    state[names[0]] = torch.zeros(0, 32)
    lorakit.initialize_lora_eva_weights(model, eva_state_dict=state)
    assert names[0] not in dict(model.base_model.lora_layers())
    cfg = model.peft_config["default"]
    assert cfg.target_modules == names[1:] and cfg.rank_pattern == dict.fromkeys(names[1:], 4)
    assert cfg.alpha_pattern == dict.fromkeys(names[1:], 16.0)  # alpha * new_r / r


def test_batched_pca_equals_one_layer_at_a_time_and_peft():
    from peft.utils.incremental_pca import IncrementalPCA

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 24, 24, generator=g)
    steps = [[torch.randn(40, 24, generator=g) @ mix[i] for i in range(3)] for _ in range(3)]
    together = [PcaState(6) for _ in range(3)]
    alone = [PcaState(6) for _ in range(3)]
    refs = [IncrementalPCA(n_components=6, lowrank=True, lowrank_seed=42) for _ in range(3)]
    for xs in steps:
        partial_fit_many(together, [x.clone() for x in xs], tau=0.99)
        for state, ref, x in zip(alone, refs, xs):
            partial_fit_many([state], [x.clone()], tau=0.99)
            ref.partial_fit(x.clone())
    for a, b, ref in zip(together, alone, refs):
        torch.testing.assert_close(a.components, b.components, atol=1e-10, rtol=0)
        torch.testing.assert_close(a.components, ref.components_, atol=1e-10, rtol=0)
        torch.testing.assert_close(a.explained_variance_ratio, ref.explained_variance_ratio_, atol=1e-10, rtol=0)


def test_rho_below_one_is_refused():
    with pytest.raises(ValueError, match=r"rho must be >= 1.0, got 0.5"):
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="eva", eva_config={"rho": 0.5})


def test_eva_without_dataloader_is_refused():
    config = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="eva", eva_config=lorakit.EvaConfig())
    model = lorakit.get_peft_model(MODELS["llama"][0](), config)
    with pytest.raises(ValueError, match="needs a dataloader"):
        lorakit.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="empty dataloader"):
        lorakit.initialize_lora_eva_weights(model, [])


def test_eva_on_a_non_eva_adapter_is_refused():
    model = lorakit.get_peft_model(MODELS["llama"][0](), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"needs init_lora_weights='eva'; adapter 'default' has True"):
        lorakit.initialize_lora_eva_weights(model, token_batches(1))


def test_non_linear_layers_fall_back_to_default_init_with_a_warning():
    config = lorakit.LoraConfig(
        target_modules=["emb", "lin"], r=2, init_lora_weights="eva", eva_config=lorakit.EvaConfig(rho=1)
    )
    model = lorakit.get_peft_model(BUILDERS["emb"](), config)
    data = [{"ids": torch.randint(0, 50, (4, 6))} for _ in range(3)]
    with pytest.warns(UserWarning, match=r"linear layers only.*\['emb'\]"):
        lorakit.initialize_lora_eva_weights(
            model, data, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False
        )
    assert model.base_model.model.emb.lora_embedding_A["default"].abs().sum() == 0  # embedding default: A = 0


def test_state_dict_from_the_plain_model_loads_into_the_peft_model():
    """The two-step flow: statistics on the base model first, then get_peft_model(low_cpu_mem_usage=True)."""
    data = token_batches(6)
    eva = lorakit.EvaConfig(tau=0.9)
    config = lorakit.LoraConfig(target_modules=MODELS["llama"][1], r=4, init_lora_weights="eva", eva_config=eva)
    base = MODELS["llama"][0]()
    state = lorakit.get_eva_state_dict(base, data, config, show_progress_bar=False)
    model = lorakit.get_peft_model(base, config, low_cpu_mem_usage=True)
    lorakit.initialize_lora_eva_weights(model, eva_state_dict=state)
    direct = ours_eva("llama", data)
    assert model.peft_config["default"].rank_pattern == direct.peft_config["default"].rank_pattern
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_more_components_than_input_features_is_refused():
    config = lorakit.LoraConfig(
        target_modules=["q_proj"], r=20, init_lora_weights="eva", eva_config=lorakit.EvaConfig()
    )
    model = lorakit.get_peft_model(MODELS["llama"][0](), config, low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"has 32 input features, fewer than the round\(r \* rho\) = 40"):
        lorakit.initialize_lora_eva_weights(model, token_batches(1), show_progress_bar=False)
