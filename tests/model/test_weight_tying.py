"""ensure_weight_tying on tied embeddings (lm_head.weight is embed_tokens.weight), compared with peft."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.model.weight_tying import NO_TIED_MODULES, NOT_ENSURED, NOTHING_TIED_ADDED

IDS = torch.tensor([[1, 2, 3, 4, 5]])


def tied_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def _both(tie: bool = True, **kwargs):
    models, caught = [], []
    for lib in (peft, lorakit):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            config = lib.LoraConfig(**{k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()})
            models.append(lib.get_peft_model(tied_llama(tie), config))
        caught.append(sorted({str(w.message) for w in seen if "tie" in str(w.message).lower()}))
    return models, caught


def test_saved_embedding_keeps_the_head_tied_like_peft(tmp_path):
    (theirs, ours), (their_warnings, our_warnings) = _both(
        modules_to_save=["embed_tokens"], target_modules=["q_proj"], ensure_weight_tying=True
    )
    assert our_warnings == their_warnings == []
    assert sorted(lorakit.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    head = ours.base_model.model.lm_head
    embed = ours.base_model.model.model.embed_tokens
    assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight
    # a training step moves the one shared Parameter: head and embedding stay equal, the base stays as it was
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    ours(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert not torch.equal(embed.modules_to_save["default"].weight, embed.original_module.weight)
    assert torch.equal(head.modules_to_save["default"].weight, embed.modules_to_save["default"].weight)
    # the trained adapter reloads in peft with the same logits, tied there too
    ours.eval().save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tied_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=0, atol=1e-5)
    back = lorakit.PeftModel.from_pretrained(tied_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_merge_and_unload_keeps_the_tie():
    (_, ours), _ = _both(modules_to_save=["embed_tokens"], target_modules=["q_proj"], ensure_weight_tying=True)
    with torch.no_grad():
        ours.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(1.0)
        expected = ours(input_ids=IDS).logits
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("tie", "kwargs", "message"),
    [
        (True, dict(modules_to_save=["embed_tokens"], target_modules=["q_proj"]), NOT_ENSURED),
        (True, dict(target_modules=["embed_tokens", "q_proj"]), NOT_ENSURED),
        (True, dict(target_modules=["q_proj"], ensure_weight_tying=True), NOTHING_TIED_ADDED),
        (False, dict(modules_to_save=["embed_tokens"], target_modules=["q_proj"], ensure_weight_tying=True), None),
    ],
)
def test_warnings_match_peft(tie, kwargs, message):
    _, (their_warnings, our_warnings) = _both(tie, **kwargs)
    assert our_warnings == their_warnings
    if message is not None:
        assert our_warnings == [message]


def test_no_tied_modules_warns_like_peft():
    assert NO_TIED_MODULES.startswith("You have requested `ensure_weight_tying`")
    (_, ours), (their_warnings, our_warnings) = _both(
        False, modules_to_save=["embed_tokens"], target_modules=["q_proj"], ensure_weight_tying=True
    )
    assert our_warnings == their_warnings == [NO_TIED_MODULES]
    assert not isinstance(ours.base_model.model.lm_head, lorakit.model.modules_to_save.ModulesToSaveWrapper)


def test_lora_on_a_tied_embedding_ties_the_head_factors_like_peft(tmp_path):
    (theirs, ours), (their_warnings, our_warnings) = _both(
        target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True, init_lora_weights=False
    )
    assert our_warnings == their_warnings == []
    assert sorted(lorakit.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)
    head, embed = ours.base_model.model.lm_head, ours.base_model.model.model.embed_tokens

    def assert_tied() -> None:
        torch.testing.assert_close(head.lora_A["default"].weight, embed.lora_embedding_B["default"].T, rtol=0, atol=0)
        torch.testing.assert_close(head.lora_B["default"].weight, embed.lora_embedding_A["default"].T, rtol=0, atol=0)

    assert_tied()
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    before = head.lora_B["default"].weight.detach().clone()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert not torch.equal(before, head.lora_B["default"].weight)
    assert_tied()  # one storage: a step through either layer moves both
    ours.eval().save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tied_llama(), tmp_path)
    back = lorakit.PeftModel.from_pretrained(tied_llama(), tmp_path)
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"share their LoRA factors and base weight .* merging would add the same"):
        ours.merge_and_unload()  # peft merges the delta twice into the shared weight
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=0)  # left as it was
