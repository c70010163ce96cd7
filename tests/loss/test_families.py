"""Fused loss == ordinary loss (loss and every LoRA gradient, float32 1e-5) on every family in lorakit.loss.HEADS."""

from __future__ import annotations

import pytest
import torch
from loss_families import FAMILIES, VOCAB, tiny_causal_lm
from loss_helpers import assert_same_step, batch

from lorakit import LoraConfig, get_peft_model
from lorakit.loss import HEADS


def lora(model, lm_head: bool = False, **extra):
    targets = ["q_proj", "v_proj", "c_attn", "query_key_value"] + (["lm_head"] if lm_head else [])
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[t for t in targets if t in present], **extra)
    config.init_lora_weights = False  # B != 0: every gradient is non-trivial
    return get_peft_model(model, config)


def test_every_registered_family_has_a_tiny_model():
    assert sorted(HEADS) == sorted(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_lora_on_head(name):
    model = lora(tiny_causal_lm(name), lm_head=True)
    out, ref = assert_same_step(model, **batch(VOCAB))
    if name.startswith(("Mixtral", "Qwen2Moe", "Qwen3Moe")):
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
        assert out.aux_loss > 0


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize("tie", [False, True])
def test_tied_and_untied_without_head_lora(name, tie):
    model = lora(tiny_causal_lm(name, tie=tie))
    if tie:
        base = model.get_base_model()
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert_same_step(model, **batch(VOCAB))


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_head_and_embeddings(tie):
    """modules_to_save: the full head (or, tied, the embedding matrix both ends read) gets its gradient."""
    saved = ["lm_head", "embed_tokens"] if tie else ["lm_head"]
    model = lora(tiny_causal_lm("LlamaForCausalLM", tie=tie), modules_to_save=saved)
    assert_same_step(model, **batch(VOCAB))


def test_recipes_matter():
    """Control: with the plain recipe, a softcapped (Gemma 2) and a scaled (Cohere) model lose exactness."""
    for name in ("Gemma2ForCausalLM", "CohereForCausalLM"):
        model = lora(tiny_causal_lm(name))
        saved = HEADS[name]
        HEADS[name] = HEADS["LlamaForCausalLM"]
        try:
            with pytest.raises(AssertionError):
                assert_same_step(model, **batch(VOCAB))
        finally:
            HEADS[name] = saved
