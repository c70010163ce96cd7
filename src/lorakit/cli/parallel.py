"""How ``lorakit train`` runs the model on its ranks: one process, DDP (the default under torchrun) or FSDP2
(``--fsdp``: the frozen base sharded per decoder layer with ``lorakit.integrations.distributed.shard_lora_model``).

Each mode is a small class in ``MODES``: the module the forward goes through, gradient sync only on a step's last
micro-batch, and the adapter and optimizer state whole on every rank for a checkpoint (under FSDP2 a collective:
every rank calls it). Optimizer states are saved whole, in the optimizer's own layout (parameter order), so a
checkpoint of any mode resumes in any other and on any number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .ranks import World


class OneProcess:
    name: ClassVar[str] = "one process"

    def __init__(self, model: nn.Module, world: World) -> None:
        self.model = model  # forward passes go through this
        self.world = world

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward + backward: gradients are reduced across ranks on the last only."""
        return contextlib.nullcontext()

    def adapter_state(self, peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The adapter's tensors whole (a collective under FSDP2), or None: save_pretrained reads the model."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


class DataParallel(OneProcess):
    """Every rank holds the whole model; DDP all-reduces the adapter's gradients (its buckets hold only them)."""

    name = "DDP"

    def __init__(self, model: nn.Module, world: World) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if world.device.startswith("cuda") else None
        # buffers (rotary tables, ...) are loaded alike on every rank and never trained: no broadcast per forward
        super().__init__(DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False), world)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()


def _whole(value: Any) -> Any:
    return value.full_tensor().cpu() if hasattr(value, "full_tensor") else value


class FullyShardedBase(OneProcess):
    """FSDP2: parameters become DTensor shards; the adapter and optimizer states are gathered to save them."""

    name = "FSDP2"

    def __init__(self, model: nn.Module, world: World) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from ..integrations.distributed import shard_lora_model

        mesh = init_device_mesh(world.device.split(":")[0], (world.size,))
        try:
            shard_lora_model(model, mesh=mesh)
        except ValueError as err:
            from .errors import CliError, one_line

            raise CliError(f"--fsdp: {one_line(err)}") from None
        super().__init__(model, world)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def adapter_state(self, peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
        from ..integrations.distributed import gather_adapter_state_dict

        return gather_adapter_state_dict(peft_model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()  # the same order on every rank, so the gathers line up
        whole = {index: {k: _whole(v) for k, v in entry.items()} for index, entry in state["state"].items()}
        return {"state": whole, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not hasattr(param, "device_mesh"):
                    continue
                entry = optimizer.state.get(param, {})
                for key, value in entry.items():
                    if not hasattr(value, "device_mesh") and value.shape == param.shape:
                        entry[key] = distribute_tensor(value, param.device_mesh, param.placements)


MODES: dict[str, type[OneProcess]] = {"one": OneProcess, "ddp": DataParallel, "fsdp": FullyShardedBase}
"""How the ranks share the work -> its class; ``mode_of`` picks the key."""


def mode_of(world: World, fsdp: bool) -> str:
    return "fsdp" if fsdp else "ddp" if world.distributed else "one"


def parallelize(model: nn.Module, world: World, fsdp: bool) -> OneProcess:
    """Wrap (DDP) or shard (FSDP2) the PeftModel; call before building the optimizer."""
    return MODES[mode_of(world, fsdp)](model, world)
