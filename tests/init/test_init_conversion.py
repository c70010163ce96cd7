"""save_pretrained(path_initial_model_for_weight_conversion=...): PiSSA/OLoRA/CorDA -> plain LoRA of rank 2r."""

import json
import math

import peft
import pytest
import torch
from init_helpers import MODELS, logits
from safetensors.torch import load_file

import lorakit
from models import make_inputs


def fine_tune(model, seed: int = 7) -> None:
    """Stand-in for training: move every adapter factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=g))


def convert(tmp_path, kind, init, targets=None, **kwargs):
    """(fine-tuned outputs, folder of the converted adapter)."""
    build, default_targets = MODELS[kind]
    config = lorakit.LoraConfig(
        target_modules=targets or default_targets, r=4, lora_alpha=8, init_lora_weights=init, **kwargs
    )
    base = build()
    if init == "corda":
        g = torch.Generator().manual_seed(0)
        lorakit.preprocess_corda(base, config, run_model=lambda: base(torch.randint(1, 96, (3, 10), generator=g)))
    model = lorakit.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "init")
    fine_tune(model)
    expected = logits(model, make_inputs(kind))
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    return expected, tmp_path / "lora"


@pytest.mark.parametrize(
    ("kind", "init"), [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa_niter_2"), ("llama", "corda")]
)
def test_converted_adapter_reproduces_fine_tuned_model_on_original_base(tmp_path, kind, init):
    expected, folder = convert(tmp_path, kind, init)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    inputs = make_inputs(kind)
    for loader in (lorakit.PeftModel, peft.PeftModel):
        loaded = loader.from_pretrained(MODELS[kind][0](), folder)
        torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=0)


def test_embedding_adapters_convert_too(tmp_path):
    """An embedding PiSSA adapter (lora_embedding_A/B) converts like the linear ones."""
    expected, folder = convert(tmp_path, "llama", "pissa", targets=["embed_tokens", "q_proj"])
    loaded = lorakit.PeftModel.from_pretrained(MODELS["llama"][0](), folder)
    torch.testing.assert_close(logits(loaded, make_inputs("llama")), expected, atol=1e-5, rtol=0)


def test_rslora_keeps_its_scaling_and_patterns_double(tmp_path):
    expected, folder = convert(tmp_path, "llama", "pissa", use_rslora=True)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(8 * math.sqrt(2))
    loaded = lorakit.PeftModel.from_pretrained(MODELS["llama"][0](), folder)
    torch.testing.assert_close(logits(loaded, make_inputs("llama")), expected, atol=1e-5, rtol=0)

    expected, folder = convert(
        tmp_path / "p", "llama", "olora", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}
    )
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"q_proj": 4} and saved["alpha_pattern"] == {"v_proj": 8}
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"][0](), folder)
    torch.testing.assert_close(logits(loaded, make_inputs("llama")), expected, atol=1e-5, rtol=0)


def test_same_files_as_peft_conversion(tmp_path):
    build, targets = MODELS["llama"]
    kwargs = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights="pissa")
    for name, lib in (("ours", lorakit), ("peft", peft)):
        model = lib.get_peft_model(build(), lib.LoraConfig(**kwargs))
        model.save_pretrained(tmp_path / name / "init")
        fine_tune(model)
        model.save_pretrained(
            tmp_path / name / "lora", path_initial_model_for_weight_conversion=str(tmp_path / name / "init")
        )
    ours, theirs = (load_file(tmp_path / n / "lora" / "adapter_model.safetensors") for n in ("ours", "peft"))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0, msg=key)


def test_rslora_with_patterns_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_rslora=True together with rank_pattern"):
        convert(tmp_path, "llama", "pissa", use_rslora=True, rank_pattern={"q_proj": 2})


def test_initial_adapter_of_another_rank_is_refused(tmp_path):
    build, targets = MODELS["llama"]
    other = lorakit.get_peft_model(build(), lorakit.LoraConfig(target_modules=targets, r=2, init_lora_weights="pissa"))
    other.save_pretrained(tmp_path / "init")
    model = lorakit.get_peft_model(build(), lorakit.LoraConfig(target_modules=targets, r=4, init_lora_weights="pissa"))
    with pytest.raises(ValueError, match=r"shape \(2, 32\), the trained adapter \(4, 32\)"):
        model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
