"""Default target modules per transformers ``model_type``, used when ``target_modules=None``."""

from __future__ import annotations

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "stablelm": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "cohere": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
}
"""Users may add entries: ``DEFAULT_TARGET_MODULES["my_arch"] = ["wq", "wv"]``."""


def default_target_modules(model_type: str | None) -> list[str]:
    """Targets for ``model_type``; ValueError naming the known types when there is no entry."""
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    raise ValueError(
        f"target_modules=None but lorakit has no default targets for model_type={model_type!r}; pass target_modules "
        f"explicitly (a list, a regex or 'all-linear'). Known model types: {', '.join(sorted(DEFAULT_TARGET_MODULES))}."
    )
