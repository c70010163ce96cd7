"""TRL's SFT, DPO and GRPO trainers with lorakit models (lorakit.integrations.trl), checked against peft + TRL."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import trl  # noqa: E402
from trl_cases import (  # noqa: E402
    DEMO_MODEL,
    base_model,
    common_args,
    lorakit_config,
    losses,
    matched_models,
    preference_dataset,
    prompt_dataset,
    sft_dataset,
    storages,
    tokenizer,
)

import lorakit  # noqa: E402
from lorakit.integrations.trl import AdapterReference, DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: E402

FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def _sft(cls, model, out, **kw):
    args = trl.SFTConfig(**common_args(out, **kw), max_length=48)
    return cls(model=model, args=args, train_dataset=sft_dataset(), processing_class=tokenizer())


def _dpo(cls, model, out, **kw):
    args = trl.DPOConfig(**common_args(out, **kw), max_length=48)
    return cls(model=model, args=args, train_dataset=preference_dataset(), processing_class=tokenizer())


def test_sft_losses_equal_peft_with_trl(tmp_path):
    ours, theirs = matched_models()
    mine = _sft(SFTTrainer, ours, tmp_path / "lk")
    ref = _sft(trl.SFTTrainer, theirs, tmp_path / "pf")
    mine.train()
    ref.train()
    assert len(losses(mine)) == 3
    torch.testing.assert_close(torch.tensor(losses(mine)), torch.tensor(losses(ref)), rtol=1e-5, atol=1e-6)


def test_dpo_losses_equal_peft_with_trl_and_reference_is_a_frozen_copy(tmp_path):
    ours, theirs = matched_models()
    mine = _dpo(DPOTrainer, ours, tmp_path / "lk")
    ref = _dpo(trl.DPOTrainer, theirs, tmp_path / "pf")
    # a model trained before: both libraries score the reference with a frozen "ref" copy of the adapter
    assert isinstance(mine.ref_model, AdapterReference) and mine.ref_model.adapter_name == "ref"
    assert "ref" in ours.peft_config and "ref" in theirs.peft_config
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".ref." in n)
    mine.train()
    ref.train()
    torch.testing.assert_close(torch.tensor(losses(mine)), torch.tensor(losses(ref)), rtol=1e-5, atol=1e-6)


def test_dpo_with_peft_config_keeps_one_copy_of_the_base(tmp_path):
    """No second model: the reference owns nothing and the trainer holds the policy's storage only."""
    base = base_model()
    before = storages(base)
    trainer = DPOTrainer(
        model=base,
        args=trl.DPOConfig(**common_args(tmp_path, max_steps=1), max_length=48),
        train_dataset=preference_dataset(),
        processing_class=tokenizer(),
        peft_config=lorakit_config(),
    )
    assert isinstance(trainer.model, lorakit.PeftModel)
    assert isinstance(trainer.ref_model, AdapterReference) and trainer.ref_model.adapter_name is None
    assert list(trainer.ref_model.parameters()) == [] and list(trainer.ref_model.buffers()) == []
    adapter = {p.untyped_storage().data_ptr() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert storages(trainer.model, trainer.ref_model) == before | adapter
    trainer.train()
    assert len(losses(trainer)) == 1


def test_reference_mode_gives_base_outputs_and_restores_the_adapter():
    model = lorakit.get_peft_model(base_model(), lorakit_config(init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with model.disable_adapter():
            expected = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        got = AdapterReference(model)(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_sft_from_model_id_checkpoints_adapter_only_resumes_and_loads_in_peft(tmp_path):
    out = tmp_path / "run"

    def from_model_id():
        return SFTTrainer(
            model=DEMO_MODEL,
            args=trl.SFTConfig(**common_args(out, max_steps=4, save_strategy="steps", save_steps=2), max_length=48),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            peft_config=lorakit_config(),
        )

    trainer = from_model_id()
    trainer.train()
    full = losses(trainer)
    ckpt = out / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & FULL_MODEL_FILES

    resumed = from_model_id()
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(torch.tensor(losses(resumed)[-2:]), torch.tensor(full[-2:]), rtol=1e-5, atol=1e-6)

    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert not set(os.listdir(final)) & FULL_MODEL_FILES
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    theirs = peft.PeftModel.from_pretrained(base_model(), str(final)).eval()
    ours = lorakit.PeftModel.from_pretrained(base_model(), str(final)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        trained = trainer.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits.detach(), trained, rtol=1e-5, atol=1e-5)


def test_grpo_trains_with_the_policy_as_reference(tmp_path):
    def reward(completions, **_):
        return [float(len(c)) for c in completions]

    base = base_model()
    before = storages(base)
    args = trl.GRPOConfig(
        **common_args(tmp_path, max_steps=1),
        num_generations=4,
        max_completion_length=6,
        beta=0.1,
    )
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
        peft_config=lorakit_config(),
    )
    assert isinstance(trainer.ref_model, AdapterReference)
    adapter = {p.untyped_storage().data_ptr() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert storages(trainer.model, trainer.ref_model) == before | adapter
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "kl" in logged and torch.isfinite(torch.tensor(logged["loss"]))


# ---------------------------------------------------------------------------------------------- bad input
def test_peft_config_must_be_a_lorakit_config(tmp_path):
    with pytest.raises(TypeError, match=r"lorakit\.LoraConfig.*from lorakit import LoraConfig"):
        SFTTrainer(
            model=base_model(),
            args=trl.SFTConfig(**common_args(tmp_path)),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            peft_config=peft.LoraConfig(target_modules=["q_proj"]),
        )


def test_adapter_model_plus_peft_config_is_refused(tmp_path):
    model = lorakit.get_peft_model(base_model(), lorakit_config())
    with pytest.raises(ValueError, match=r"already has lorakit adapters \(\['default'\]\)"):
        SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common_args(tmp_path)),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            peft_config=lorakit_config(),
        )


def test_reference_sharing_the_policy_is_refused(tmp_path):
    base = base_model()
    model = lorakit.get_peft_model(base, lorakit_config())
    with pytest.raises(ValueError, match="ref_model shares weights with the policy"):
        DPOTrainer(
            model=model,
            ref_model=base,
            args=trl.DPOConfig(**common_args(tmp_path)),
            train_dataset=preference_dataset(),
            processing_class=tokenizer(),
        )


def test_lora_on_the_output_head_is_refused(tmp_path):
    model = lorakit.get_peft_model(base_model(), lorakit.LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="output head"):
        _sft(SFTTrainer, model, tmp_path)


def test_lora_on_the_output_head_is_refused_for_a_model_id_too(tmp_path):
    with pytest.raises(ValueError, match="output head"):
        SFTTrainer(
            model=DEMO_MODEL,
            args=trl.SFTConfig(**common_args(tmp_path)),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            peft_config=lorakit.LoraConfig(target_modules=["q_proj", "lm_head"]),
        )


def test_trl_own_trainer_with_a_lorakit_model_is_refused_at_construction(tmp_path):
    model = lorakit.get_peft_model(base_model(), lorakit_config())
    with pytest.raises(TypeError, match=r"SFTTrainer was given a lorakit model.*lorakit\.integrations\.trl"):
        _sft(trl.SFTTrainer, model, tmp_path)


def test_the_old_recipe_names_the_trl_classes(tmp_path):
    from lorakit.integrations.transformers import LorakitTrainerMixin

    class MySFT(LorakitTrainerMixin, trl.SFTTrainer):
        pass

    with pytest.raises(TypeError, match=r"cannot adapt TRL's SFTTrainer: use lorakit\.integrations\.trl"):
        _sft(MySFT, lorakit.get_peft_model(base_model(), lorakit_config()), tmp_path)
