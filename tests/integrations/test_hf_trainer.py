"""transformers' Trainer with LorakitTrainer: loss falls, checkpoints hold only the adapter, resuming continues."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from models import tiny_llama

transformers = pytest.importorskip("transformers")
from lorakit.integrations.transformers import LorakitTrainer  # noqa: E402

STEPS, SAVE_EVERY = 6, 3
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"}


class RepeatedRows(torch.utils.data.Dataset):
    """Four fixed rows repeated: a causal LM fits them quickly. ``note`` is a column the model does not accept."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(1, 96, (8,), generator=g) for _ in range(4)] * 6

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i], "note": "not a model input"}


class StepRecorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _model(adapter_seed: int = 0):
    model = lorakit.get_peft_model(
        tiny_llama(),
        lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4),
    )
    torch.manual_seed(adapter_seed)  # a different start for the adapter shows that resuming restores it
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    return model


def _args(output_dir) -> transformers.TrainingArguments:
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return transformers.TrainingArguments(
        str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=SAVE_EVERY,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **{checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": True}},
    )


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = LorakitTrainer(model=_model(), args=_args(out), train_dataset=RepeatedRows())
    trainer.train()
    return out, trainer


def test_loss_falls_and_checkpoints_hold_only_the_adapter(trained):
    out, trainer = trained
    losses = _losses(trainer)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.15  # deterministic: 4.60 -> 4.37 on CPU
    for step in (SAVE_EVERY, STEPS):
        files = set(os.listdir(out / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= files
        assert not files & FULL_MODEL_FILES, files
        saved = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert saved and all(".lora_" in key and ".default." not in key for key in saved)
    final = load_file(out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    in_model = _lora_state(trainer.model)
    for key, tensor in final.items():
        memory = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(in_model[memory], tensor, atol=0, rtol=0)


def test_resume_continues_steps_loss_and_weights(trained, tmp_path):
    out, first = trained
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"
    model = _model(adapter_seed=1)
    steps_run = StepRecorder()
    trainer = LorakitTrainer(model=model, args=_args(tmp_path), train_dataset=RepeatedRows(), callbacks=[steps_run])
    restored = {}
    original_loader = trainer._load_from_checkpoint

    def load_and_record(path, model=None):
        original_loader(path, model)
        restored.update(_lora_state(trainer.model))

    trainer._load_from_checkpoint = load_and_record
    params_before = {n: p for n, p in model.named_parameters()}
    trainer.train(resume_from_checkpoint=str(checkpoint))

    saved = load_file(checkpoint / "adapter_model.safetensors")
    for key, tensor in saved.items():
        torch.testing.assert_close(restored[key.replace(".weight", ".default.weight")], tensor, atol=0, rtol=0)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # restored in place
    assert trainer.state.global_step == STEPS
    assert steps_run.steps == list(range(SAVE_EVERY + 1, STEPS + 1))
    resumed, uninterrupted = _losses(trainer), _losses(first)
    assert sorted(resumed) == sorted(uninterrupted)  # the history of steps 1..3 comes from the checkpoint
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], abs=1e-5)
    for key, tensor in _lora_state(first.model).items():
        torch.testing.assert_close(_lora_state(model)[key], tensor, atol=1e-6, rtol=1e-5)


def test_load_best_model_and_save_model(trained, tmp_path):
    out, _ = trained
    trainer = LorakitTrainer(model=_model(adapter_seed=2), args=_args(tmp_path), train_dataset=RepeatedRows())
    trainer.state.best_model_checkpoint = str(out / f"checkpoint-{SAVE_EVERY}")
    trainer._load_best_model()
    saved = load_file(out / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors")
    state = _lora_state(trainer.model)
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key.replace(".weight", ".default.weight")], tensor, atol=0, rtol=0)

    trainer.save_model(str(tmp_path / "final"))
    assert not set(os.listdir(tmp_path / "final")) & FULL_MODEL_FILES
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    ids = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_resume_from_a_folder_without_adapter_files_is_an_error(tmp_path):
    trainer = LorakitTrainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=RepeatedRows())
    with pytest.raises(ValueError, match=r"No adapter files .* for the model's adapters \['default'\]"):
        trainer._load_from_checkpoint(str(tmp_path))


def test_resume_from_a_checkpoint_of_another_rank_names_the_folder(trained, tmp_path):
    out, _ = trained
    model = lorakit.get_peft_model(
        tiny_llama(), lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=2)
    )
    trainer = LorakitTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=RepeatedRows())
    with pytest.raises(ValueError, match=r"Cannot resume adapter 'default' from .*checkpoint-3: .*shape"):
        trainer._load_from_checkpoint(str(out / f"checkpoint-{SAVE_EVERY}"))


def test_save_uses_a_state_dict_it_is_given(tmp_path):
    """Distributed wrappers hand _save a gathered state dict: its values, not the local parameters, are written."""
    trainer = LorakitTrainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=RepeatedRows())
    gathered = {k: torch.zeros_like(v) if "lora_" in k else v for k, v in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved and all(not t.any() for t in saved.values())
    assert not set(os.listdir(tmp_path / "saved")) & FULL_MODEL_FILES


def test_fused_loss_is_on_by_default_and_matches_the_full_logits(tmp_path):
    """LorakitTrainer turns on the chunked loss for causal LMs: same losses and adapter as fused_loss=False."""
    runs = {}
    for fused in (True, False):
        model = _model()
        args = _args(tmp_path / str(fused))
        trainer = LorakitTrainer(model=model, args=args, train_dataset=RepeatedRows(), fused_loss=fused)
        assert (model.__dict__.get("_fused_loss") is not None) is fused
        trainer.train()
        runs[fused] = (_losses(trainer), _lora_state(model))
        model.train()
        out = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
        assert (out.logits is None) is fused
    for step, loss in runs[False][0].items():
        assert runs[True][0][step] == pytest.approx(loss, rel=1e-5)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-6)
