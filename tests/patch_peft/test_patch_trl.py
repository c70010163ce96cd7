"""TRL trainers built with ``peft_config=peft.LoraConfig(...)``, patched before ``train()``: the same losses and
adapter weights as the unpatched trainer, with lorakit's fused nodes doing the work (CPU, the bundled demo model)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
pytest.importorskip("datasets")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integrations"))

from peft_cases import count_fast_paths, relative_error  # noqa: E402
from trl_cases import TARGETS, base_model, common_args, losses, preference_dataset, sft_dataset, tokenizer  # noqa: E402

import lorakit  # noqa: E402


def _peft_config() -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _run(make_trainer, patch: bool):
    torch.manual_seed(0)
    trainer = make_trainer()
    if patch:
        lorakit.patch_peft(trainer.model)  # the documented recipe: patch trainer.model, then train()
    trainer.train()
    return losses(trainer), _adapter(trainer.model)


def _assert_same_run(ours, theirs) -> None:
    (our_losses, our_adapter), (their_losses, their_adapter) = ours, theirs
    assert len(our_losses) == 3
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-5, atol=1e-6)
    assert our_adapter.keys() == their_adapter.keys()
    assert max(relative_error(our_adapter[k], v) for k, v in their_adapter.items()) < 1e-5


def test_sft_trainer_with_peft_config_patched(tmp_path, monkeypatch):
    def make():
        args = trl.SFTConfig(**common_args(tmp_path), max_length=48)
        return trl.SFTTrainer(
            model=base_model(),
            args=args,
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            peft_config=_peft_config(),
        )

    theirs = _run(make, patch=False)
    with count_fast_paths(monkeypatch) as hits:
        ours = _run(make, patch=True)
    _assert_same_run(ours, theirs)
    assert hits.fused >= 3 * 2 * len(TARGETS)  # every step, every adapted layer of the demo model's 2 blocks


def test_dpo_trainer_with_peft_config_patched(tmp_path, monkeypatch):
    """TRL scores the reference with peft's disable_adapter(): peft's forward there, the fused nodes elsewhere."""

    def make():
        args = trl.DPOConfig(**common_args(tmp_path), max_length=48)
        return trl.DPOTrainer(
            model=base_model(),
            args=args,
            train_dataset=preference_dataset(),
            processing_class=tokenizer(),
            peft_config=_peft_config(),
        )

    theirs = _run(make, patch=False)
    with count_fast_paths(monkeypatch) as hits:
        ours = _run(make, patch=True)
    _assert_same_run(ours, theirs)
    assert hits.fused > 0
