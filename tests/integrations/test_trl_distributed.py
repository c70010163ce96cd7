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
    return [torch.load(out / f"sft_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_sft_under_ddp_equals_one_process_on_the_whole_batch(ranks, tmp_path):
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
    for result in ranks:
        assert result["find_unused"] is False
        assert result["unused_warnings"] == []
