"""Tiny transformers models built from their config classes, for the lorakit-vs-peft sweep.

Each architecture is a ``model_type`` (a key of transformers' ``CONFIG_MAPPING``) and a task (which auto mapping
builds it). ``tiny_config`` shrinks the default config generically (hidden sizes, layers, heads, vocabulary,
images, audio; dropouts off so train-mode forwards are deterministic); ``OVERRIDES`` holds what an architecture
needs beyond that. ``FAST`` is the subset run by default (one or more per kind); ``make sweep`` runs all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEQ = 6
BATCH = 2
VOCAB = 128

TASKS = {
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "seq_cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_cls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "image_cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio_cls": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "ctc": "MODEL_FOR_CTC_MAPPING_NAMES",
    "speech_seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
}
"""task -> the auto mapping (``transformers.models.auto.modeling_auto``) that names the model class."""

TASK_TYPES = {
    "causal": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
    "seq_cls": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
}
"""task -> LoraConfig.task_type. Speech seq2seq (whisper) runs without one: peft's PeftModelForSeq2SeqLM passes
``input_ids`` to every model, which whisper's decoder rejects (a peft defect, listed in test_sweep.KNOWN)."""
GENERATIVE = {"causal", "seq2seq", "speech_seq2seq"}

_SIZES = {
    # width
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embedding_size": 32, "word_embed_proj_dim": 32,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8,
    # feed-forward
    "intermediate_size": 48, "ffn_dim": 48, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "d_ff": 48, "n_inner": 48,
    "hidden_dim": 48, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "moe_num_experts": 4, "moe_k": 2,
    # positions, vocabulary, images, audio
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_source_positions": 32,
    "max_target_positions": 32, "vocab_size": VOCAB, "image_size": 32, "patch_size": 8, "num_mel_bins": 16,
}  # fmt: skip

_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


@dataclass(frozen=True)
class Arch:
    model_type: str
    task: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.task}"


def _shrink(config, overrides: dict) -> None:
    for key, value in _SIZES.items():
        if key in config.__dict__ and isinstance(getattr(config, key), int) and not isinstance(value, bool):
            setattr(config, key, value)
    for key, value in list(config.__dict__.items()):
        if ("dropout" in key or key.endswith("_pdrop") or key.endswith("drop_rate")) and isinstance(value, float):
            setattr(config, key, 0.0)
    for key in _TOKEN_IDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB - 4:
            setattr(config, key, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3))
    for key, value in overrides.items():
        setattr(config, key, value)
    layer_types = config.__dict__.get("layer_types")
    cut = isinstance(layer_types, (list, tuple)) and "layer_types" not in overrides
    if cut and hasattr(config, "num_hidden_layers"):
        config.layer_types = list(layer_types[: config.num_hidden_layers])
    sub_names = [k for k, v in config.__dict__.items() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    for key in sub_names:
        _shrink(getattr(config, key), {})


def tiny_config(arch: Arch):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch.model_type)
    _shrink(config, dict(arch.overrides))
    if arch.task in ("seq_cls", "token_cls", "image_cls", "audio_cls"):
        config.num_labels = 3
    if getattr(config, "pad_token_id", None) is None and arch.task == "seq_cls":
        config.pad_token_id = 0
    return config


def model_class(arch: Arch):
    import transformers
    from transformers.models.auto import modeling_auto

    name = getattr(modeling_auto, TASKS[arch.task])[arch.model_type]
    return getattr(transformers, name if isinstance(name, str) else name[0])


def build(arch: Arch, seed: int = 0) -> torch.nn.Module:
    """The tiny model, same weights for the same seed; float32, eval mode."""
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = model_class(arch)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    generation = getattr(model, "generation_config", None)
    encoder_decoder = getattr(config, "is_encoder_decoder", False) and generation is not None
    if encoder_decoder and generation.decoder_start_token_id is None:  # T5-style: left to the generation config
        generation.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    return model.eval()


def inputs(arch: Arch, model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of BATCH rows for the model's task (no labels)."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    if arch.task == "image_cls":
        size, channels = getattr(config, "image_size", 32), getattr(config, "num_channels", 3)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=gen)}
    if arch.task in ("audio_cls", "ctc"):
        return {"input_values": torch.randn(BATCH, 1600, generator=gen)}
    if arch.task == "speech_seq2seq":
        frames = 2 * config.max_source_positions
        features = torch.randn(BATCH, config.num_mel_bins, frames, generator=gen)
        start = config.decoder_start_token_id
        return {"input_features": features, "decoder_input_ids": torch.full((BATCH, 2), start)}
    ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch.task == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(4, VOCAB, (BATCH, 3), generator=gen)
    return batch


def first_output(out) -> torch.Tensor:
    """The logits (or the first tensor) of a model output."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


def _arch(model_type: str, task: str, **overrides) -> Arch:
    return Arch(model_type, task, tuple({**OVERRIDES.get(model_type, {}), **overrides}.items()))


_WAV = dict(
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    num_feat_extract_layers=2,
    vocab_size=32,
    mask_time_prob=0.0,
    mask_feature_prob=0.0,
)
_MLA = dict(
    q_lora_rank=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    head_dim=4,
    num_key_value_heads=4,
)
_ROTARY = dict(rotary_dim=4)
OVERRIDES: dict[str, dict] = {
    "gptj": _ROTARY,
    "codegen": _ROTARY,
    "nemotron": dict(head_dim=8, num_key_value_heads=2),
    "deepseek_v3": _MLA,
    "glm4_moe": dict(head_dim=8),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1], mamba_d_head=8, mamba_n_heads=8, mamba_d_state=8, mamba_expand=2),
    "falcon_h1": dict(mamba_d_head=8, mamba_n_heads=8, mamba_d_ssm=64, mamba_d_state=8, mamba_n_groups=1),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=32, attention_window_size=16),
    "deberta": dict(pooler_hidden_size=32),
    "deberta-v2": dict(pooler_hidden_size=32),
    "roc_bert": dict(pronunciation_vocab_size=16, shape_vocab_size=16, pronunciation_embed_dim=8, shape_embed_dim=8),
    "ctrl": dict(dff=48),
    "led": dict(attention_window=[4, 4]),
    "funnel": dict(block_sizes=[1, 1], d_inner=48, d_head=8),
    "falcon": dict(num_kv_heads=2),
    "mobilebert": dict(intra_bottleneck_size=16, true_hidden_size=16, embedding_size=16, num_feedforward_networks=1),
}  # fmt: skip
_SWIN = dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, image_size=32, patch_size=4)

ARCHITECTURES: list[Arch] = [
    # causal language models
    *(
        _arch(t, "causal")
        for t in (
            "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "falcon",
            "gpt_neox", "gptj", "gpt_neo", "bloom", "opt", "codegen", "starcoder2", "olmo", "olmo2", "cohere",
            "stablelm", "persimmon", "mpt", "biogpt", "xglm", "granite", "helium", "glm", "glm4", "nemotron",
            "smollm3", "arcee", "exaone4", "gpt_bigcode", "ernie4_5", "seed_oss", "apertus", "ctrl",
        )
    ),
    # mixture of experts
    *(
        _arch(t, "causal")
        for t in (
            "mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "granitemoe", "phimoe", "glm4_moe",
            "ernie4_5_moe", "minimax", "flex_olmo", "jetmoe", "gpt_oss",
        )
    ),
    # hybrid (attention + recurrent / state-space layers)
    *(_arch(t, "causal") for t in ("jamba", "falcon_h1", "bamba", "qwen3_next", "lfm2", "recurrent_gemma")),
    # sequence-to-sequence
    *(
        _arch(t, "seq2seq")
        for t in (
            "t5", "bart", "mbart", "pegasus", "marian", "m2m_100", "led", "mt5", "umt5", "longt5", "blenderbot",
            "blenderbot-small", "plbart", "switch_transformers", "prophetnet",
        )
    ),
    # sequence / token classification (encoders and decoders)
    *(
        _arch(t, "seq_cls")
        for t in (
            "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet",
            "roc_bert", "convbert", "squeezebert", "mobilebert", "megatron-bert", "rembert", "modernbert",
            "nystromformer", "ernie", "llama", "gpt2",
        )
    ),
    *(_arch(t, "token_cls") for t in ("bert", "roberta", "deberta-v2", "funnel", "qwen2")),
    # vision
    *(_arch(t, "image_cls") for t in ("vit", "deit", "beit", "dinov2", "vit_msn", "data2vec-vision")),
    _arch("swin", "image_cls", **_SWIN),
    # speech
    _arch("wav2vec2", "ctc", **_WAV),
    _arch("hubert", "ctc", **_WAV),
    _arch("wavlm", "audio_cls", **_WAV),
    _arch("data2vec-audio", "audio_cls", **_WAV),
    _arch("whisper", "speech_seq2seq", num_mel_bins=16, max_source_positions=16, max_target_positions=16),
]  # fmt: skip

FAST = {
    "llama-causal", "gpt2-causal", "mixtral-causal", "deepseek_v3-causal", "t5-seq2seq", "bart-seq2seq",
    "bert-seq_cls", "roberta-token_cls", "vit-image_cls", "wav2vec2-ctc", "whisper-speech_seq2seq",
    "jamba-causal",
}  # fmt: skip
"""Architectures run by default (one or more per kind); the others carry the ``sweep`` mark."""
