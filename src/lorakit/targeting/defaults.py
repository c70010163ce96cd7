"""Default target modules per transformers ``model_type``, used when ``target_modules=None``."""

from __future__ import annotations

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
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
    "llama4": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "layoutlm": ["query", "value"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
"""Users may add entries: ``DEFAULT_TARGET_MODULES["my_arch"] = ["wq", "wv"]`` (or a regex string). Every entry
PEFT has agrees with PEFT's table (tests check this)."""


def default_target_modules(model_type: str | None) -> list[str] | str:
    """Targets for ``model_type`` (a list, or a regex string); ValueError naming the known types otherwise."""
    if model_type in DEFAULT_TARGET_MODULES:
        value = DEFAULT_TARGET_MODULES[model_type]
        return value if isinstance(value, str) else list(value)
    raise ValueError(
        f"target_modules=None but lorakit has no default targets for model_type={model_type!r}; pass target_modules "
        f"explicitly (a list, a regex or 'all-linear'). Known model types: {', '.join(sorted(DEFAULT_TARGET_MODULES))}."
    )
