"""The ``target_modules=None`` defaults lorakit has where PEFT 0.21 has none (issue 15, item 3; listed in
docs/features.md): each names the attention's query and value projections (phi3: its fused qkv_proj) of a model
built tiny from its transformers config, in every layer, where PEFT raises asking for target_modules."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers import AutoConfig, AutoModel

import lorakit
from lorakit.targeting import DEFAULT_TARGET_MODULES

BEYOND_PEFT = {
    "cohere": ("CohereAttention", ["q_proj", "v_proj"]),
    "distilbert": ("DistilBertSelfAttention", ["q_lin", "v_lin"]),
    "granite": ("GraniteAttention", ["q_proj", "v_proj"]),
    "mbart": ("MBartAttention", ["q_proj", "v_proj"]),
    "olmo": ("OlmoAttention", ["q_proj", "v_proj"]),
    "olmo2": ("Olmo2Attention", ["q_proj", "v_proj"]),
    "phi3": ("Phi3Attention", ["qkv_proj"]),
    "qwen2_moe": ("Qwen2MoeAttention", ["q_proj", "v_proj"]),
    "qwen3_moe": ("Qwen3MoeAttention", ["q_proj", "v_proj"]),
    "starcoder2": ("Starcoder2Attention", ["q_proj", "v_proj"]),
}
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
    dim=32, hidden_dim=32, n_layers=2, n_heads=4, d_model=32, encoder_layers=1, decoder_layers=1,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8,
)  # fmt: skip


def _tiny(model_type: str):
    config = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_config(config)


def test_the_table_has_exactly_these_entries_beyond_peft():
    assert {t for t in DEFAULT_TARGET_MODULES if t not in PEFT_DEFAULTS} >= set(BEYOND_PEFT)
    for model_type, (_, names) in BEYOND_PEFT.items():
        assert model_type not in PEFT_DEFAULTS
        assert DEFAULT_TARGET_MODULES[model_type] == names


@pytest.mark.parametrize("model_type", list(BEYOND_PEFT))
def test_defaults_are_the_query_and_value_projections_of_every_attention(model_type):
    attention_class, names = BEYOND_PEFT[model_type]
    model = _tiny(model_type)
    attentions = [n for n, m in model.named_modules() if type(m).__name__ == attention_class]
    assert attentions, f"no {attention_class} in {model_type}"
    expected = {f"{a}.{leaf}" for a in attentions for leaf in names}
    wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig())
    adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected
    with pytest.raises(ValueError, match=r"target_modules"):  # "Please specify" (qwen3_moe: its MoE rewrite's)
        peft.get_peft_model(_tiny(model_type), peft.LoraConfig())
