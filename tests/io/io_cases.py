"""(model, config) cases shared by the I/O tests: each is built identically in peft and in lorakit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import BUILDERS, make_inputs, output_tensor

# name -> (model kind, LoraConfig kwargs, extra adapters {name: kwargs}, save kwargs)
CASES: dict[str, tuple[str, dict, dict, dict]] = {
    "llama_qv": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8), {}, {}),
    "llama_patterns": (
        "llama",
        dict(
            target_modules="all-linear",
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
            alpha_pattern={"v_proj": 3},
            task_type="CAUSAL_LM",
        ),
        {},
        {},
    ),
    "llama_rslora_dropout": (
        "llama",
        dict(target_modules=["k_proj", "o_proj"], r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1),
        {},
        {},
    ),
    "llama_embeddings": ("llama", dict(target_modules=["embed_tokens", "lm_head", "q_proj"], r=4), {}, {}),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, fan_in_fan_out=True), {}, {}),
    "bert_seq_cls": (
        "bert",
        dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, modules_to_save=["pooler.dense"]),
        {},
        {},
    ),
    "mlp_lora_bias": ("mlp", dict(target_modules=["lin0", "head"], r=3, lora_bias=True), {}, {}),
    "mlp_bias_all": ("mlp", dict(target_modules=["lin0", "lin1"], r=3, bias="all"), {}, {}),
    "mlp_bias_lora_only": ("mlp", dict(target_modules=["lin0", "head"], r=3, bias="lora_only"), {}, {}),
    "mlp_bin": ("mlp", dict(target_modules=["lin0", "lin1", "head"], r=2), {}, {"safe_serialization": False}),
    "conv": ("conv", dict(target_modules=["conv1d", "conv2d", "grouped", "conv3d"], r=2), {}, {}),
    "emb": ("emb", dict(target_modules=["emb", "lin"], r=3, lora_alpha=6), {}, {}),
    "llama_named_adapters": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], r=4),
        {"other": dict(target_modules=["k_proj", "down_proj"], r=2, lora_alpha=5), "third": dict(r=3)},
        {},
    ),
}


def perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Add noise to every trainable tensor, as training would, so that every saved tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def perturb_embeddings(model: torch.nn.Module, seed: int = 1) -> None:
    """Change the base embedding weights (as a vocabulary resize or training would)."""
    g = torch.Generator().manual_seed(seed)
    base = model.get_base_model()
    with torch.no_grad():
        for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
            weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
            weight.add_(torch.randn(weight.shape, generator=g) * 0.1)


def build(lib, name: str, seed: int = 0):
    """The case's PeftModel from ``lib`` (peft or lorakit), adapters perturbed; returns (model, kind)."""
    kind, kwargs, extra, _ = CASES[name]
    model = lib.get_peft_model(BUILDERS[kind](), lib.LoraConfig(init_lora_weights=False, **kwargs))
    for offset, (adapter, adapter_kwargs) in enumerate(extra.items(), start=1):
        model.add_adapter(adapter, lib.LoraConfig(init_lora_weights=False, **adapter_kwargs))
        model.set_adapter(adapter)
        perturb_trainable(model, seed + offset)
    model.set_adapter("default")
    perturb_trainable(model, seed)
    if "embed_tokens" in (kwargs.get("target_modules") or []):
        perturb_embeddings(model, seed + 10)
    return model.eval(), kind


def adapter_names(name: str) -> list[str]:
    return ["default", *CASES[name][2]]


def logits(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**make_inputs(kind)))


def read_saved(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as dict, tensors) of one saved adapter folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if (folder / "adapter_model.safetensors").exists():
        return config, load_file(str(folder / "adapter_model.safetensors"))
    return config, torch.load(folder / "adapter_model.bin", weights_only=True)


def adapter_folder(root: Path, adapter: str) -> Path:
    return root if adapter == "default" else root / adapter


def strip_config_record(folder: Path) -> None:
    """Rewrite a saved adapter's weights file without lorakit's record of its config (as PEFT writes it)."""
    from safetensors.torch import save_file

    safetensors = folder / "adapter_model.safetensors"
    if safetensors.exists():
        save_file(load_file(str(safetensors)), str(safetensors), metadata={"format": "pt"})
    else:
        path = folder / "adapter_model.bin"
        torch.save(dict(torch.load(path, weights_only=True)), path)
