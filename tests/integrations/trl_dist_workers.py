"""Code run in the spawned processes of test_trl_distributed.py: TRL's SFT and DPO trainers (lorakit classes) and
LorakitTrainer under DDP, 2 processes with gloo, as torchrun would start them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

ROWS_PER_RANK = 2
STEPS = 2


def run_sft(out: Path, rows_per_device: int, **extra) -> dict:
    import trl
    from trl_cases import common_args, seeded_model, sft_dataset, tokenizer

    from lorakit.integrations.trl import SFTTrainer

    model = seeded_model()
    start = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    args = trl.SFTConfig(
        **common_args(out, max_steps=STEPS, per_device_train_batch_size=rows_per_device, learning_rate=1e-3, **extra),
        max_length=48,
        lr_scheduler_type="constant",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(8), processing_class=tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    wrapped = trainer.model_wrapped
    return {
        "weights": {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k},
        "moved": max((p.detach() - start[k]).abs().max().item() for k, p in model.named_parameters() if k in start),
        "wrapper": type(wrapped).__name__,
        "find_unused": getattr(wrapped, "find_unused_parameters", None),
        "unused_warnings": [str(w.message) for w in caught if "find_unused_parameters" in str(w.message)],
    }


def fsdp2_trainer_save(out: Path) -> None:
    """LorakitTrainer.save_model on FSDP2 shards (accelerate shards with FSDP only on GPUs, so the model is sharded
    here with fully_shard and the trainer is told so): every rank gathers, rank 0 writes a complete adapter."""
    import transformers
    from trl_cases import seeded_model

    from lorakit.integrations.distributed import shard_lora_model
    from lorakit.integrations.transformers import LorakitTrainer

    model = shard_lora_model(seeded_model())
    args = transformers.TrainingArguments(
        str(out / "fsdp_trainer"), report_to="none", use_cpu=True, ddp_backend="gloo", save_strategy="no"
    )
    trainer = LorakitTrainer(model=model, args=args)
    trainer.is_fsdp_enabled = True
    trainer.save_model(str(out / "fsdp_adapter"))


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_sft(Path(out) / "sft", ROWS_PER_RANK, ddp_backend="gloo")
        torch.save(result, Path(out) / f"sft_rank{rank}.pt")
        fsdp2_trainer_save(Path(out))
    finally:
        dist.destroy_process_group()
