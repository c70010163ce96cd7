"""Two adapter-loading leftovers, each checked against peft 0.21.2 or against an ordinary load.

1. A base-model module whose own name starts with ``lora_`` (here ``lora_proj``) is no LoRA factor: its bias (bias
   "all" / "lora_only") and, as modules_to_save, its copy must be saved and loaded under its own keys.
2. ``low_cpu_mem_usage`` loads give modules_to_save copies (and saved base biases) the model's dtype, as an
   ordinary load does, instead of the checkpoint's.
"""

from __future__ import annotations

import tempfile
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lorakit
from models import MLP


class LoraNamedNet(nn.Module):
    """q -> lora_proj -> head; ``lora_proj`` is an ordinary base Linear with a bias, named like a LoRA attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.lora_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 8) -> (N, 3)"""
        return self.head(self.lora_proj(torch.relu(self.q(x))))


def _net(seed: int = 0) -> LoraNamedNet:
    torch.manual_seed(seed)
    return LoraNamedNet().eval()


LORA_NAMED_CASES = {
    "all_q": dict(target_modules=["q"], bias="all"),
    "all_q_lora_proj": dict(target_modules=["q", "lora_proj"], bias="all"),
    "lora_only_q_lora_proj": dict(target_modules=["q", "lora_proj"], bias="lora_only"),
    "mts_lora_proj": dict(target_modules=["q"], modules_to_save=["lora_proj"]),
    "dora_lora_proj_all": dict(target_modules=["lora_proj"], bias="all", use_dora=True),
}


def _trained(lib, kwargs: dict) -> nn.Module:
    """A model of ``lib`` whose every trainable tensor (LoRA factors, saved biases, copies) differs from init."""
    model = lib.get_peft_model(_net(), lib.LoraConfig(r=2, init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.25)
    return model.eval()


def _saved(model: nn.Module) -> tuple[str, set[str]]:
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return folder, set(load_file(f"{folder}/adapter_model.safetensors"))


@pytest.mark.parametrize("case", sorted(LORA_NAMED_CASES))
def test_module_named_lora_is_no_lora_factor(case):
    """Saved keys equal peft's, and every save/load direction (lorakit->peft, peft->lorakit, lorakit->lorakit)
    reproduces the saved model's outputs.

    peft decides by name fragments as well ("lora_" in the key), yet for these cases its saved keys and its own
    round trip are right (checked here too), so peft is the oracle. lorakit skipped ``lora_proj``'s bias on save
    (bias="all") and re-keyed ``lora_proj.bias`` / ``lora_proj.weight`` as LoRA factors on load."""
    kwargs = LORA_NAMED_CASES[case]
    x = torch.randn(4, 8)
    ours, theirs = _trained(lorakit, kwargs), _trained(peft, kwargs)
    our_folder, our_keys = _saved(ours)
    peft_folder, peft_keys = _saved(theirs)
    assert our_keys == peft_keys
    for source, folder in ((ours, our_folder), (theirs, peft_folder)):
        expected = source(x)
        for lib in (lorakit, peft):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a missing or unexpected key warns in both libraries
                loaded = lib.PeftModel.from_pretrained(_net(), folder)
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


def test_module_named_lora_is_not_taken_for_another_adapter():
    """A second adapter's load neither claims nor reports the first adapter's ``lora_proj`` tensors."""
    ours = _trained(lorakit, LORA_NAMED_CASES["mts_lora_proj"])
    folder, _ = _saved(ours)
    model = lorakit.PeftModel.from_pretrained(_net(), folder)
    result = model.load_adapter(folder, "two")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("two")
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), ours(x), rtol=0, atol=1e-6)


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return MLP().to(dtype).eval()


def _mts_folder(dtype: torch.dtype, bias: str) -> str:
    """An adapter with a modules_to_save head (and saved base biases for bias="all"), tensors in ``dtype``."""
    config = lorakit.LoraConfig(
        target_modules=["lin0"], modules_to_save=["head"], r=2, bias=bias, init_lora_weights=False
    )
    model = lorakit.get_peft_model(_mlp(dtype), config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.25)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return folder


def _load(lib, dtype: torch.dtype, folder: str, how: str, low_cpu_mem_usage: bool) -> nn.Module:
    if how == "from_pretrained":
        return lib.PeftModel.from_pretrained(_mlp(dtype), folder, low_cpu_mem_usage=low_cpu_mem_usage)
    model = lib.get_peft_model(_mlp(dtype), lib.LoraConfig(target_modules=["lin1"], r=2))
    model.load_adapter(folder, "loaded", low_cpu_mem_usage=low_cpu_mem_usage)
    model.set_adapter("loaded")
    return model.eval()


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: param.dtype for name, param in model.named_parameters()}


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize(
    ("saved", "model_dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["f32>bf16", "bf16>f32"],
)
def test_low_cpu_mem_usage_gives_modules_to_save_the_model_dtype(saved, model_dtype, bias, how):
    """Every parameter gets the dtype of an ordinary load, and the outputs are the ordinary load's.

    The ordinary load is the oracle: its dtypes equal peft's ordinary load. peft 0.21.2's own low_cpu_mem_usage load
    keeps the checkpoint's dtype for the modules_to_save copy (its forward then fails on a dtype mismatch), so peft's
    low_cpu_mem_usage path is not used as the reference."""
    folder = _mts_folder(saved, bias)
    x = torch.randn(3, 10, dtype=model_dtype)
    ordinary = _load(lorakit, model_dtype, folder, how, low_cpu_mem_usage=False)
    low = _load(lorakit, model_dtype, folder, how, low_cpu_mem_usage=True)
    reference = _load(peft, model_dtype, folder, how, low_cpu_mem_usage=False)
    assert _dtypes(low) == _dtypes(ordinary) == _dtypes(reference)
    assert {n for n, p in low.named_parameters() if p.requires_grad} == {
        n for n, p in ordinary.named_parameters() if p.requires_grad
    }
    torch.testing.assert_close(low(x), ordinary(x), rtol=0, atol=0)


def test_hotswap_refuses_the_bias_of_a_base_module_named_like_a_lora_attribute(tmp_path):
    """A hotswap takes LoRA tensors only: the saved bias of the base module ``lora_proj`` (bias="all") is refused
    as a non-LoRA tensor, with the model left as it was (a name-fragment test took it for a LoRA tensor)."""
    from lorakit.utils.hotswap import hotswap_adapter

    config = dict(r=2, lora_alpha=4, target_modules=["q"], init_lora_weights=False)
    torch.manual_seed(1)
    lorakit.get_peft_model(_net(), lorakit.LoraConfig(**config)).save_pretrained(tmp_path / "plain")
    torch.manual_seed(2)
    lorakit.get_peft_model(_net(), lorakit.LoraConfig(**config, bias="all")).save_pretrained(tmp_path / "bias")
    model = lorakit.PeftModel.from_pretrained(_net(), tmp_path / "plain")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    # head.bias, q's base bias and lora_proj.bias: three (a name-fragment test counted two)
    with pytest.raises(ValueError, match=r"only LoRA tensors can be swapped, but the new adapter also has 3 others"):
        hotswap_adapter(model, str(tmp_path / "bias"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
