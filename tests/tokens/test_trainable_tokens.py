"""trainable_token_indices: parity with peft (keys, outputs, checkpoints both ways), training touches only the chosen
rows, tied heads follow, merging, several adapters, mixed batches and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from tokens_helpers import IDS, batch, randomise, tiny_llama_tokens

import lorakit
from lorakit.tokens import TrainableTokensWrapper

DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _pair(tied: bool = False, **kwargs):
    """The same model and config in peft and in lorakit."""
    kwargs = {"target_modules": ["q_proj"], "trainable_token_indices": IDS, **kwargs}
    ref = peft.get_peft_model(tiny_llama_tokens(tied=tied), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(tiny_llama_tokens(tied=tied), lorakit.LoraConfig(**kwargs))
    return ref.eval(), ours.eval()


def _logits(model, ids=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(batch() if ids is None else ids, **kwargs).logits


@pytest.mark.parametrize("tied", [False, True])
def test_keys_and_outputs_match_peft(tied):
    ref, ours = _pair(tied)
    ref_sd = peft.get_peft_model_state_dict(ref)
    ours_sd = lorakit.get_peft_model_state_dict(ours)
    assert sorted(ours_sd) == sorted(ref_sd)
    assert ours_sd[DELTA_KEY].shape == (len(IDS), 32)
    base = tiny_llama_tokens(tied=tied)
    # rows start as W[ids]: a no-op (a tied head recomputes those logits from the rows: matmul rounding only)
    torch.testing.assert_close(_logits(ours), _logits(base), atol=1e-6 if tied else 0, rtol=0)
    values = randomise(ref_sd)
    peft.set_peft_model_state_dict(ref, values)
    lorakit.set_peft_model_state_dict(ours, values)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=1e-5)
    assert (_logits(ours) - _logits(base)).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoints_load_both_ways(tmp_path, tied):
    ref, ours = _pair(tied)
    peft.set_peft_model_state_dict(ref, randomise(peft.get_peft_model_state_dict(ref), seed=1))
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours), seed=2))
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    ref_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ref_file) == sorted(ours_file)

    into_ours = lorakit.PeftModel.from_pretrained(tiny_llama_tokens(tied=tied), tmp_path / "peft")
    assert not any(p.requires_grad for p in into_ours.parameters())  # is_trainable=False freezes the rows too
    torch.testing.assert_close(_logits(into_ours), _logits(ref), atol=1e-5, rtol=1e-5)
    into_peft = peft.PeftModel.from_pretrained(tiny_llama_tokens(tied=tied), tmp_path / "ours")
    torch.testing.assert_close(_logits(into_peft), _logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        into_ours.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"],
        ref_file[DELTA_KEY],
    )


def test_dict_form_on_embedding_and_untied_head_matches_peft(tmp_path):
    spec = {"embed_tokens": [2, 3], "lm_head": [4, 9, 11]}
    ref, ours = _pair(trainable_token_indices=spec)
    values = randomise(peft.get_peft_model_state_dict(ref))
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in values
    assert sorted(lorakit.get_peft_model_state_dict(ours)) == sorted(values)
    peft.set_peft_model_state_dict(ref, values)
    lorakit.set_peft_model_state_dict(ours, values)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=1e-5)


def test_training_changes_only_the_chosen_rows():
    model = lorakit.get_peft_model(
        tiny_llama_tokens(), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    )
    wrapper = model.base_model.model.model.embed_tokens
    original = wrapper.original_module.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "token" in n} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    }
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = batch()
    ids[0, 2] = 50  # token 7 is now absent from the batch: its row gets no gradient
    ids[:, 3:] = ids[:, 3:].clamp(max=40)
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        delta_grad = wrapper.token_adapter.trainable_tokens_delta["default"].grad
        assert delta_grad[:2].abs().sum() > 0 and delta_grad[2].abs().sum() == 0
        opt.step()
    torch.testing.assert_close(wrapper.original_module.weight, original, atol=0, rtol=0)  # base never written
    merged = model.merge_and_unload().model.embed_tokens.weight.detach()
    changed = (merged != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 5]  # the trainable rows that were in the batch; nothing else


def test_tied_head_follows_the_embedding_rows():
    _, ours = _pair(tied=True)
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours)))
    inner = ours.base_model.model
    assert isinstance(inner.lm_head, TrainableTokensWrapper)
    rows = inner.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    hidden = torch.randn(2, 4, 32)
    with torch.no_grad():
        logits = inner.lm_head(hidden)
        torch.testing.assert_close(logits[..., IDS], hidden @ rows.T)
        others = [i for i in range(96) if i not in IDS]
        torch.testing.assert_close(logits[..., others], hidden @ inner.lm_head.original_module.weight[others].T)
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied after merging
    torch.testing.assert_close(merged.lm_head.weight[IDS], rows.detach())


def test_merge_unmerge_and_unload():
    _, ours = _pair(tied=True)
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours)))
    embedding = ours.base_model.model.model.embed_tokens.original_module.weight
    original = embedding.detach().clone()
    expected = _logits(ours)
    ours.base_model.merge_adapter()
    assert not torch.equal(embedding, original)
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=1e-5)
    ours.base_model.unmerge_adapter()
    torch.testing.assert_close(embedding, original, atol=0, rtol=0)
    with ours.disable_adapter():
        # q_proj's LoRA merge and unmerge round its weight; the token rows came back exactly (above)
        torch.testing.assert_close(_logits(ours), _logits(tiny_llama_tokens(tied=True)), atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensWrapper) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_unload_restores_the_base_model():
    _, ours = _pair()
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours)))
    base = ours.unload()
    assert set(base.state_dict()) == set(tiny_llama_tokens().state_dict())
    torch.testing.assert_close(_logits(base), _logits(tiny_llama_tokens()), atol=0, rtol=0)


def test_several_adapters_switch_and_mix_per_row():
    _, ours = _pair()
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["v_proj"], trainable_token_indices=[5, 20]))
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours), 1))
    other_values = randomise(lorakit.get_peft_model_state_dict(ours, adapter_name="other"), 2)
    lorakit.set_peft_model_state_dict(ours, other_values, adapter_name="other")
    ids = batch()
    ids[2, 0] = 20
    default = _logits(ours, ids)
    ours.set_adapter("other")
    other = _logits(ours, ids)
    assert (default - other).abs().max() > 1e-2
    names = ["default", "__base__", "other"]
    mixed = _logits(ours, ids, adapter_names=names)
    base = _logits(tiny_llama_tokens(), ids)
    for row, expected in enumerate([default, base, other]):
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-5)
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"]
    torch.testing.assert_close(_logits(ours, ids), default, atol=0, rtol=0)


def test_mixed_batch_matches_peft():
    ref, ours = _pair()
    for model in (ref, ours):
        model.add_adapter(
            "other", type(model.peft_config["default"])(target_modules=["q_proj"], trainable_token_indices=[5, 20])
        )
    for name, seed in (("default", 3), ("other", 4)):
        values = randomise(peft.get_peft_model_state_dict(ref, adapter_name=name), seed)
        peft.set_peft_model_state_dict(ref, values, adapter_name=name)
        lorakit.set_peft_model_state_dict(ours, values, adapter_name=name)
    names = ["other", "default", "__base__"]
    torch.testing.assert_close(
        _logits(ours, adapter_names=names), _logits(ref, adapter_names=names), atol=1e-5, rtol=1e-5
    )


def test_overlapping_active_adapters_are_refused():
    _, ours = _pair()
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7, 8]))
    ours.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"Adapters 'default' and 'other' both train token 7"):
        _logits(ours)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(trainable_token_indices=[3, 96]),
            r"token ids \[96\] are out of range; the vocabulary of 'model\.embed_tokens' has 96 tokens",
        ),
        (dict(trainable_token_indices=[3, 3]), r"lists token ids \[3\] more than once"),
        (
            dict(trainable_token_indices={"nope": [1]}),
            r"module 'nope' not found in the base model; its embedding modules are: model\.embed_tokens",
        ),
        (dict(target_modules=["embed_tokens"]), r"'model\.embed_tokens' carries LoRA"),
        (dict(modules_to_save=["embed_tokens"]), r"already trained in full via modules_to_save"),
        (
            dict(trainable_token_indices={"model.norm": [1]}),
            r"'model\.norm' is a LlamaRMSNorm; trainable tokens apply to",
        ),
    ],
)
def test_errors_name_what_was_asked(kwargs, message):
    config = lorakit.LoraConfig(**{"target_modules": ["q_proj"], "trainable_token_indices": IDS, **kwargs})
    model = tiny_llama_tokens()
    with pytest.raises(ValueError, match=message):
        lorakit.get_peft_model(model, config)
    assert not any(isinstance(m, TrainableTokensWrapper) for m in model.modules())  # left as it was


def test_tied_layers_with_different_ids():
    spec = {"embed_tokens": [1, 2], "lm_head": [3]}
    with pytest.raises(ValueError, match=r"Cannot ensure weight tying when different token indices"):
        lorakit.get_peft_model(
            tiny_llama_tokens(tied=True),
            lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=spec, ensure_weight_tying=True),
        )
    ref, ours = _pair(tied=True, trainable_token_indices=spec)  # without ensure_weight_tying: trained separately
    values = randomise(peft.get_peft_model_state_dict(ref))
    assert sorted(lorakit.get_peft_model_state_dict(ours)) == sorted(values)
    peft.set_peft_model_state_dict(ref, values)
    lorakit.set_peft_model_state_dict(ours, values)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=1e-5)


def test_ensure_weight_tying_on_an_untied_model_warns():
    with pytest.warns(UserWarning, match=r"ensure_weight_tying=True but the model has no output layer tied"):
        lorakit.get_peft_model(
            tiny_llama_tokens(),
            lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS, ensure_weight_tying=True),
        )


def test_greedy_generate_matches_peft():
    ref, ours = _pair(tied=True)
    values = randomise(peft.get_peft_model_state_dict(ref), seed=5)
    peft.set_peft_model_state_dict(ref, values)
    lorakit.set_peft_model_state_dict(ours, values)
    prompt = batch()[:, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **kwargs), ref.generate(input_ids=prompt, **kwargs))


def test_weighted_combination_of_token_adapters_is_refused():
    _, ours = _pair()
    with pytest.raises(ValueError, match=r"cannot combine trainable token rows \(adapters \['default'\]\)"):
        ours.base_model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


def test_saving_an_adapter_without_tokens_next_to_one_with_tokens(tmp_path):
    _, ours = _pair()
    ours.add_adapter("plain", lorakit.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    lorakit.set_peft_model_state_dict(ours, randomise(lorakit.get_peft_model_state_dict(ours)))
    ours.save_pretrained(tmp_path)  # PEFT 0.21 fails here; both adapters are written
    assert DELTA_KEY not in load_file(tmp_path / "plain" / "adapter_model.safetensors")
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama_tokens(), tmp_path)
    loaded.load_adapter(tmp_path / "plain", "plain")
    for name in ("default", "plain"):
        ours.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(_logits(loaded), _logits(ours), atol=0, rtol=0)
