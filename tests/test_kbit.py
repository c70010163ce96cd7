"""prepare_model_for_kbit_training against peft's: parameter dtypes and trainability, checkpointing, and a QLoRA
training step (loss and every LoRA gradient) on a 4-bit base with bfloat16 compute and storage."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402

import lorakit  # noqa: E402
from bnb_helpers import (  # noqa: E402
    assert_same_training_step,
    load_quantised,
    lora_state,
    save_llama64,
    tiny_llama64,
    token_ids,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BF16 = dict(bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    return save_llama64(tmp_path_factory)


def _parameters(model) -> dict[str, tuple[str, torch.dtype, bool]]:
    return {n: (type(p).__name__, p.dtype, p.requires_grad) for n, p in model.named_parameters()}


def test_prepared_4bit_model_matches_peft_and_trains_the_same(llama64_dir):
    ours = lorakit.prepare_model_for_kbit_training(load_quantised(llama64_dir, "4bit", **BF16))
    ref = peft.prepare_model_for_kbit_training(load_quantised(llama64_dir, "4bit", **BF16))
    params = _parameters(ours)
    assert params == _parameters(ref)
    assert {v for v in params.values()} == {("Parameter", torch.float32, False), ("Params4bit", torch.bfloat16, False)}
    assert ours.is_gradient_checkpointing and ref.is_gradient_checkpointing
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.get_peft_model(ours, lorakit.LoraConfig(**config))
    ref = peft.get_peft_model(ref, peft.LoraConfig(**config))
    ref.load_state_dict(lora_state(ours), strict=False)
    assert_same_training_step(ours, ref, token_ids())  # every LoRA factor, through the checkpointed blocks


def test_unquantised_model_is_frozen_and_upcast_without_checkpointing():
    half = tiny_llama64().to(torch.bfloat16)
    ours = lorakit.prepare_model_for_kbit_training(half)
    ref = peft.prepare_model_for_kbit_training(tiny_llama64().to(torch.bfloat16))
    assert _parameters(ours) == _parameters(ref)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert not ours.is_gradient_checkpointing


def test_checkpointing_can_be_left_off_or_configured(llama64_dir):
    off = lorakit.prepare_model_for_kbit_training(load_quantised(llama64_dir, "8bit"), use_gradient_checkpointing=False)
    assert not off.is_gradient_checkpointing
    assert not any(p.requires_grad for p in off.parameters())
    model = lorakit.prepare_model_for_kbit_training(
        load_quantised(llama64_dir, "8bit"), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert model.is_gradient_checkpointing
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.train()
    ids = token_ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
