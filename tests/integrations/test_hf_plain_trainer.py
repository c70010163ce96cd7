"""A plain transformers.Trainer given a lorakit model is refused at construction with one clear message; the task
models keep their input columns and train with LorakitTrainer."""

from __future__ import annotations

import inspect

import pytest
import torch

import lorakit
from models import tiny_bert_cls, tiny_llama

transformers = pytest.importorskip("transformers")


class Rows(torch.utils.data.Dataset):
    def __init__(self, with_labels_for_lm: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = [torch.randint(1, 96, (8,), generator=g) for _ in range(4)] * 4
        self.lm = with_labels_for_lm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "note": "dropped"}
        row["labels"] = self.ids[i] if self.lm else torch.tensor((i % 4) % 3)
        return row


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **{"save_strategy": "no", **kw},
    )


def _train(model, dataset, tmp_path) -> list[float]:
    from lorakit.integrations.transformers import LorakitTrainer

    trainer = LorakitTrainer(model=model, args=_args(tmp_path), train_dataset=dataset)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_task_models_keep_inputs_and_loss_falls(task, tmp_path):
    base = tiny_llama() if task == "CAUSAL_LM" else tiny_bert_cls()
    targets = ["q_proj", "v_proj"] if task == "CAUSAL_LM" else ["query", "value"]
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(task_type=task, target_modules=targets, r=4))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    losses = _train(model, Rows(with_labels_for_lm=task == "CAUSAL_LM"), tmp_path)
    assert len(losses) == 6
    assert losses[-1] < losses[0]


def test_named_forward_passes_positional_inputs_through():
    model = lorakit.get_peft_model(
        tiny_llama(), lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], init_lora_weights=False)
    )
    ids = torch.randint(1, 96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_plain_trainer_is_refused_at_construction(tied, tmp_path):
    """Before: on tied embeddings the first checkpoint died in safetensors ("Some tensors share memory"); untied, every
    checkpoint held the whole model and the final save had no adapter_config.json."""
    base = tiny_llama()
    if tied:
        base.config.tie_word_embeddings = True
        base.tie_weights()
        assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4))
    with pytest.raises(TypeError, match=r"^Trainer was given a lorakit model.*LorakitTrainer.*integrations\.trl"):
        transformers.Trainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=1))
    assert not (tmp_path / "checkpoint-1").exists()


def test_refusal_only_concerns_trainers():
    """Reading the same attribute or the state dict outside a Trainer works as before."""
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], r=4))
    assert hasattr(model, "accepts_loss_kwargs") == hasattr(model.get_base_model(), "accepts_loss_kwargs")
    assert any("lora_A" in k for k in model.state_dict())
