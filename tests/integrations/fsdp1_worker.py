"""Worker for tests/integrations/test_fsdp1_state_dict.py: FSDP1 (use_orig_params=True) on CPU with gloo."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch


def run(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    import lorakit
    from models import MLP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], init_lora_weights=False)
        model = lorakit.get_peft_model(MLP(), config)
        plain = lorakit.get_peft_model_state_dict(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = FSDP(
                model,
                use_orig_params=True,
                device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
            )
            sharded = lorakit.get_peft_model_state_dict(wrapped)  # a collective: every rank calls it
            torch.manual_seed(1)  # other adapter weights, then the first one's loaded into the sharded model
            other = lorakit.get_peft_model(MLP(), config)
            other = FSDP(
                other,
                use_orig_params=True,
                device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
            )
            before = lorakit.get_peft_model_state_dict(other)
            result = lorakit.set_peft_model_state_dict(other, plain)
            reloaded = lorakit.get_peft_model_state_dict(other)
        torch.save(
            {"plain": plain, "fsdp": sharded, "before": before, "reloaded": reloaded, "result": tuple(result)},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
