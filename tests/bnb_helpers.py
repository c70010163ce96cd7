"""Shared pieces of the bitsandbytes tests: a tiny Llama saved once and loaded in 4 or 8 bits, and a shim that lets
peft's LoftQ (which hard-codes a CUDA/XPU compute device) run on CPU as the reference.

The Llama's widths are multiples of bitsandbytes' 4-bit block size (64): on CPUs with AVX512-BF16, bitsandbytes
repacks 4-bit weights on the first no-grad forward and that repacking needs whole blocks per row.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

# where the quantised models live: "cpu" in CI; LORAKIT_BNB_TEST_DEVICE=cuda runs the same tests on bitsandbytes'
# CUDA kernels (a GPU machine with bitsandbytes installed)
DEVICE = os.environ.get("LORAKIT_BNB_TEST_DEVICE", "cpu")

LLAMA64 = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
QUANTISATION = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}


def tiny_llama64(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA64)).eval()


def save_llama64(tmp_path_factory) -> Path:
    """A folder with the unquantised tiny Llama (config + model.safetensors)."""
    path = tmp_path_factory.mktemp("llama64")
    tiny_llama64().save_pretrained(path)
    return path


def load_quantised(path, bits: str, **overrides):
    """The saved tiny Llama loaded on ``DEVICE`` through transformers' BitsAndBytesConfig ("4bit" or "8bit")."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = {**QUANTISATION[bits], **overrides}
    dtype = overrides.get("bnb_4bit_compute_dtype", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**settings), device_map=DEVICE, dtype=dtype
        )


def token_ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, LLAMA64["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_training_step(ours, ref, ids: torch.Tensor) -> None:
    """One language-model loss and backward on both models (in train mode): equal losses, and every trainable
    parameter (2 factors x 7 projections x 2 layers) gets a non-zero gradient equal to peft's."""
    ours.train()
    ref.train()
    loss = ours(input_ids=ids, labels=ids).loss
    loss_ref = ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    loss.backward()
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == len(grads_ref) == 2 * 7 * 2
    for name, param in trained:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, grads_ref[name], atol=1e-6, rtol=1e-5)


def _cpu(device):
    if isinstance(device, str) and device.startswith(("cuda", "xpu")):
        return "cpu"
    if isinstance(device, torch.device) and device.type in ("cuda", "xpu"):
        return torch.device("cpu")
    return device


def _redirect(method):
    def to(self, *args, **kwargs):
        args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return method(self, *args, **kwargs)

    return to


def peft_loftq_on_cpu(monkeypatch):
    """peft's LoftQ module, patched for the test: it moves tensors to "cuda" (or "xpu") unconditionally, and here such
    moves stay on the CPU, so peft's own code computes the reference on the same bitsandbytes CPU quantiser."""
    import bitsandbytes as bnb

    monkeypatch.setattr(torch.Tensor, "to", _redirect(torch.Tensor.to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", _redirect(bnb.nn.Params4bit.to))
    from peft.utils import loftq_utils

    return loftq_utils
