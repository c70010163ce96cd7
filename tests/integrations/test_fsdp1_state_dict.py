"""get_peft_model_state_dict and set_peft_model_state_dict under FSDP1 (FullyShardedDataParallel,
use_orig_params=True, nested units): the adapter's full tensors on every rank, as without FSDP (it returned {}
before), and loaded back into a sharded model, in 2 CPU processes (gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_workers import free_port
from fsdp1_worker import run

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)


def test_fsdp1_state_dict_equals_the_unwrapped_one(tmp_path):
    torch.multiprocessing.spawn(run, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        plain, sharded = result["plain"], result["fsdp"]
        assert sorted(sharded) == sorted(plain) and len(plain) == 6  # lin0/lin1 A and B, head weight and bias
        for key, tensor in plain.items():
            torch.testing.assert_close(sharded[key], tensor, rtol=0, atol=0, msg=key)
        # set_peft_model_state_dict into a sharded model: every key lands (it refused them before)
        assert result["result"] == ([], [])
        assert any(not torch.equal(result["before"][k], plain[k]) for k in plain)
        for key, tensor in plain.items():
            torch.testing.assert_close(result["reloaded"][key], tensor, rtol=0, atol=0, msg=key)


def test_wrapper_segments_are_left_out_of_adapter_keys():
    from lorakit.io.state_dict import clean_name

    assert clean_name("_fsdp_wrapped_module.base_model.model.lin0._fsdp_wrapped_module") == "base_model.model.lin0"
    assert clean_name("model.layers.0._checkpoint_wrapped_module.q_proj") == "model.layers.0.q_proj"
    assert clean_name("_orig_mod.base_model") == "_orig_mod.base_model"  # torch.compile keeps it in its keys
