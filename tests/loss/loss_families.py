"""Tiny config-built causal LMs, one per family the fused loss knows (``lorakit.loss.HEADS``)."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)
QWEN_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, output_router_logits=True, router_aux_loss_coef=0.05
)

# class name -> (config class, extra config arguments); the extras make each family's special step bite
FAMILIES: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 8}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 8}),
    "Phi3ForCausalLM": ("Phi3Config", {"pad_token_id": 0}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "Starcoder2ForCausalLM": ("Starcoder2Config", {"residual_dropout": 0.0, "embedding_dropout": 0.0}),
    "GPT2LMHeadModel": ("GPT2Config", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {"hidden_dropout": 0.0, "attention_dropout": 0.0}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 0.5}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 0.5}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.25}),
    "Cohere2ForCausalLM": ("Cohere2Config", {"logit_scale": 0.25}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 4.0}),
    "MixtralForCausalLM": ("MixtralConfig", MOE),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", {**QWEN_MOE, "shared_expert_intermediate_size": 24}),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {**QWEN_MOE, "head_dim": 8}),
}


def tiny_causal_lm(name: str, seed: int = 0, tie: bool = False, **overrides):
    """A float32, 2-layer ``name`` model with random weights (seeded), in train mode."""
    import transformers

    config_name, extra = FAMILIES[name]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, "tie_word_embeddings": tie, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config)
    with torch.no_grad():  # bigger logits than the tiny init gives, so softcap and scaling are not near-linear
        model.get_output_embeddings().weight.mul_(20.0)
    return model.float().train()
