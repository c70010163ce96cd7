"""Code run in the spawned processes of test_distributed.py (a module of its own so that spawn can import it cheaply).

Every run trains the same tiny Llama LoRA for STEPS AdamW steps; rank k gets rows [2k, 2k + 2) of ``batch()``, so a
single process on the whole batch is the reference (every row has the same token count: the mean of the per-rank
mean losses is the global mean loss). ``device`` "cpu" runs on gloo; "cuda" puts rank k on GPU k and runs on NCCL.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

import lorakit
from models import tiny_llama

STEPS = 3
ROWS_PER_RANK = 2
LR = 1e-2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(dtype: torch.dtype = torch.float32, dora: bool = False, device: str = "cpu") -> lorakit.PeftModel:
    """A two-adapter model: ``default`` (trained, non-zero B so the first step moves A too) and ``other`` (inactive).

    ``dora``: ``default`` is a DoRA adapter (arXiv:2402.09353) with a trained copy of ``lm_head`` (modules_to_save)."""
    extra = {"use_dora": True, "modules_to_save": ["lm_head"]} if dora else {}
    config = lorakit.LoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="gaussian", **extra
    )
    model = lorakit.get_peft_model(tiny_llama().to(dtype), config)
    model.add_adapter("other", lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2))
    with torch.no_grad():  # gaussian init leaves B = 0; make it non-zero so both factors get a gradient at step 1
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model.to(device).train()


def batch(world: int) -> torch.Tensor:
    return torch.randint(1, 96, (ROWS_PER_RANK * world, 8), generator=torch.Generator().manual_seed(1))


def train(model: torch.nn.Module, ids: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    ids = ids.to(params[0].device)
    optimizer = torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def _ddp(rank: int, world: int, out: Path, device: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = build(device=device)
    # find_unused_parameters left False on purpose: nothing trainable is unused
    ddp = DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    logged = ddp._get_ddp_logging_data()  # the reducer's view: what its buckets hold
    bucketed = {k: logged[k] for k in ("num_parameter_tensors", "total_parameter_size_bytes")}
    requires_grad = {n for n, p in model.named_parameters() if p.requires_grad}
    ids = batch(world)[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    loss = train(ddp, ids)
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n]
    # DistributedDataParallel.module is the PeftModel; every rank calls save, only rank 0 writes
    ddp.module.save_pretrained(out / "ddp_adapter", is_main_process=rank == 0)
    torch.save(
        {
            "weights": lora_weights(model),
            "loss": loss,
            "requires_grad": requires_grad,
            "bucketed": bucketed,
            "base_with_grad": with_grad,
        },
        out / f"ddp_rank{rank}.pt",
    )


def _fsdp(rank: int, world: int, out: Path, device: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from lorakit.integrations.distributed import gather_adapter_state_dict, shard_lora_model

    mesh = init_device_mesh(device, (world,))
    model = shard_lora_model(build(device=device), mesh=mesh)  # fully_shard per LlamaDecoderLayer, then the root
    ids = batch(world)[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    loss = train(model, ids)
    try:  # the parameters are DTensor shards: saving them directly is refused on every rank
        model.save_pretrained(out / "fsdp_ungathered", is_main_process=rank == 0)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    adapter_sd = gather_adapter_state_dict(model)  # collective: all ranks
    model.save_pretrained(out / "fsdp_adapter", is_main_process=rank == 0, state_dict=adapter_sd)
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(out / "fsdp_full_adapter", is_main_process=rank == 0, state_dict=full_sd)
    result = {"loss": loss, "gathered_keys": sorted(adapter_sd), "full_keys": len(full_sd), "refusal": refusal}

    # DoRA magnitudes and a modules_to_save copy, sharded and gathered the same way
    dora = shard_lora_model(build(dora=True, device=device), mesh=mesh)
    train(dora, ids)
    dora.save_pretrained(
        out / "fsdp_dora_adapter", is_main_process=rank == 0, state_dict=gather_adapter_state_dict(dora)
    )

    # mixed dtypes: fp32 adapters on a bf16 base, sharded with no MixedPrecisionPolicy
    mixed = shard_lora_model(build(torch.bfloat16, device=device), mesh=mesh)
    result["mixed_loss"] = train(mixed, ids)
    result["mixed_dtypes"] = {str(p.dtype) for n, p in mixed.named_parameters() if "lora_" in n}
    result["mixed_weights"] = {k: v for k, v in gather_adapter_state_dict(mixed, ["default"]).items() if "lora_" in k}
    torch.save(result, out / f"fsdp_rank{rank}.pt")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(rank: int, world: int, out: Path, device: str) -> None:
    """LorakitTrainer in a torchrun-like environment: the Trainer wraps the model in DDP itself."""
    import transformers

    from lorakit.integrations.transformers import LorakitTrainer

    model = build()
    args = transformers.TrainingArguments(
        str(out / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=ROWS_PER_RANK,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.01,  # torch AdamW's default, as in train()
        report_to="none",
        use_cpu=device == "cpu",
        ddp_backend=BACKENDS[device],
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = LorakitTrainer(model=model, args=args, train_dataset=_Rows(batch(world)))
    trainer.train()  # every step covers the whole batch (the sampler splits it across ranks)
    trainer.save_model(str(out / "trainer_adapter"))
    wrapper = type(trainer.model_wrapped).__name__
    torch.save({"weights": lora_weights(model), "wrapper": wrapper}, out / f"trainer_rank{rank}.pt")


BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def worker(rank: int, world: int, port: int, out: str, device: str = "cpu") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(world))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKENDS[device], rank=rank, world_size=world)
    try:
        _ddp(rank, world, Path(out), device)
        _fsdp(rank, world, Path(out), device)
        _trainer(rank, world, Path(out), device)
    finally:
        dist.destroy_process_group()
