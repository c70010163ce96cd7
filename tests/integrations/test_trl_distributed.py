"""TRL's SFTTrainer (lorakit class) under DDP in 2 processes (gloo, CPU): the adapter equals one process on the
whole batch, and DDP runs without find_unused_parameters (no warning)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")
pytest.importorskip("peft")
from dist_workers import free_port
from trl_dist_workers import ROWS_PER_RANK, run_sft, worker

WORLD = 2

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_ddp")
    torch.multiprocessing.spawn(worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD)
    return out, [torch.load(out / f"sft_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_sft_under_ddp_equals_one_process_on_the_whole_batch(ranks, tmp_path):
    _, ranks = ranks
    torch.set_num_threads(1)
    want = run_sft(tmp_path / "one", ROWS_PER_RANK * WORLD)
    assert want["wrapper"] != "DistributedDataParallel"
    for result in ranks:
        assert result["wrapper"] == "DistributedDataParallel"
        assert result["weights"].keys() == want["weights"].keys()
        assert result["moved"] > 1e-4  # training moved the adapter, so the equality below means something
        for key, value in want["weights"].items():
            torch.testing.assert_close(result["weights"][key], value, rtol=0, atol=1e-6)


def test_ddp_without_unused_parameter_search(ranks):
    _, ranks = ranks
    for result in ranks:
        assert result["find_unused"] is False
        assert result["unused_warnings"] == []


def test_trainer_save_under_fsdp2_writes_the_whole_adapter(ranks):
    from safetensors.torch import load_file
    from trl_cases import seeded_model

    import lorakit

    out, _ = ranks
    want = lorakit.get_peft_model_state_dict(seeded_model())
    got = load_file(out / "fsdp_adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 24
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
