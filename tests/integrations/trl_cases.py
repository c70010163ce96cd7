"""Shared set-up for the TRL tests: the bundled demo model, in-memory datasets, matched lorakit / peft models."""

from __future__ import annotations

import os
from importlib.resources import files

import torch

import lorakit

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEMO_MODEL = str(files("lorakit") / "demo_assets" / "model")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)


def sft_dataset(n: int = 12):
    from datasets import Dataset

    months = ["January", "February", "March", "April", "May", "June"]
    rows = [{"text": f"Date 2021-0{i % 6 + 1}-1{i % 9} in words: {months[i % 6]} 1{i % 9}, 2021"} for i in range(n)]
    return Dataset.from_list(rows)


def preference_dataset(n: int = 8):
    from datasets import Dataset

    rows = [
        {"prompt": f"Date 2021-03-0{i + 1} in words:", "chosen": f" March {i + 1}, 2021", "rejected": f" May {i}, 1999"}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def prompt_dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"Date 2021-03-0{i + 1} in words:"} for i in range(n)])


def lorakit_config(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def seeded_model(seed: int = 0) -> lorakit.PeftModel:
    """A lorakit model with random (non-zero) adapter weights, the same for the same seed."""
    torch.manual_seed(seed)
    return lorakit.get_peft_model(base_model(), lorakit_config(init_lora_weights=False))


def matched_models(seed: int = 0):
    """A lorakit model with random (non-zero) adapter weights and a peft model holding exactly the same weights."""
    import peft

    ours = seeded_model(seed)
    theirs = peft.get_peft_model(
        base_model(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS)
    )
    result = peft.set_peft_model_state_dict(theirs, lorakit.get_peft_model_state_dict(ours))
    assert not [k for k in result.missing_keys if "lora_" in k]
    return ours, theirs


def common_args(output_dir, **kw) -> dict:
    args = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=0,
        bf16=False,  # TRL defaults to bf16 autocast; the parity checks run in fp32
    )
    args.update(kw)
    return args


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def storages(*modules) -> set[int]:
    """Distinct storages behind the parameters and buffers of ``modules`` (shared weights count once)."""
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()] if t.numel()}
