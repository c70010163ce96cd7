"""DDP and FSDP2 (fully_shard) training of a lorakit model in 2 processes, against one process: on CPU (gloo)
everywhere, and on 2 GPUs (NCCL, one GPU per rank) where a machine has them.

One spawn per device (module fixture) runs every distributed case, in dist_workers.py; the tests read back what it
wrote.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_workers import batch, build, free_port, lora_weights, train, worker

import lorakit
from models import tiny_llama

WORLD = 2

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
except ImportError:
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6", allow_module_level=True)


_MULTI_GPU = torch.cuda.device_count() >= WORLD and dist.is_nccl_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _MULTI_GPU, reason="needs 2 GPUs and NCCL"))]
# one process vs two differ in reduction order only; GPU GEMMs round differently again (float32, no TF32)
ATOL = {"cpu": 1e-6, "cuda": 1e-5}


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def runs(tmp_path_factory, device):
    out = tmp_path_factory.mktemp(f"dist_{device}")
    torch.multiprocessing.spawn(worker, args=(WORLD, free_port(), str(out), device), nprocs=WORLD)
    ranks = {
        kind: [torch.load(out / f"{kind}_rank{r}.pt", weights_only=False, map_location="cpu") for r in range(WORLD)]
        for kind in ("ddp", "fsdp", "trainer")
    }
    return out, ranks


@pytest.fixture(scope="module")
def reference(device):
    """One process on the same device, the whole batch (WORLD * ROWS_PER_RANK rows), same steps."""
    model = build(device=device)
    train(model, batch(WORLD))
    return model, lora_weights(model)


def _assert_same(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key].cpu(), want[key].cpu(), atol=atol, rtol=0, msg=key)


def test_ddp_matches_one_process_on_the_whole_batch(runs, reference, device):
    _, ranks = runs
    _, want = reference
    moved = max((want[k] - build().state_dict()[k]).abs().max().item() for k in want if ".default." in k)
    assert moved > 1e-3  # training did move the adapter, so equality below means something
    for result in ranks["ddp"]:
        _assert_same(result["weights"], want, atol=ATOL[device])


def test_ddp_buckets_hold_only_trainable_adapter_params(runs):
    _, ranks = runs
    result = ranks["ddp"][0]
    trainable = {n: p for n, p in result["weights"].items() if n in result["requires_grad"]}
    assert trainable.keys() == {n for n in result["weights"] if ".default." in n}  # 8 tensors; `other` is frozen
    assert result["bucketed"] == {
        "num_parameter_tensors": len(trainable),
        "total_parameter_size_bytes": sum(p.numel() * p.element_size() for p in trainable.values()),
    }
    assert result["base_with_grad"] == []  # frozen base (and the inactive adapter) never get a grad


def test_ddp_rank0_save_loads(runs, reference, device):
    out, _ = runs
    _, want = reference
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), out / "ddp_adapter")
    _assert_same(lora_weights(loaded), {k: v for k, v in want.items() if ".default." in k}, atol=ATOL[device])
    assert (out / "ddp_adapter" / "other" / "adapter_model.safetensors").is_file()


def test_fsdp2_matches_one_process_and_saves(runs, reference, device):
    out, ranks = runs
    _, want = reference
    default = {k: v for k, v in want.items() if ".default." in k}
    assert ranks["fsdp"][0]["loss"] == pytest.approx(ranks["ddp"][0]["loss"], abs=ATOL[device])
    # gathered: only the adapters' tensors (8 default + 4 other), not the 30-odd base tensors
    assert len(ranks["fsdp"][0]["gathered_keys"]) == 12
    assert all(".lora_" in k for k in ranks["fsdp"][0]["gathered_keys"])
    assert ranks["fsdp"][0]["full_keys"] > 12
    for result in ranks["fsdp"]:
        assert "gather_adapter_state_dict" in result["refusal"]
    assert not (out / "fsdp_ungathered").exists()
    for folder in ("fsdp_adapter", "fsdp_full_adapter"):
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), out / folder)
        _assert_same(lora_weights(loaded), default, atol=ATOL[device])


def test_fsdp2_dora_and_modules_to_save_match_one_process(runs, device):
    out, _ = runs
    model = build(dora=True, device=device)
    train(model, batch(WORLD))
    want = {k: v.cpu() for k, v in model.state_dict().items() if ".default." in k}
    assert any("lora_magnitude_vector" in k for k in want) and any("modules_to_save" in k for k in want)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), out / "fsdp_dora_adapter").state_dict()
    _assert_same({k: loaded[k] for k in want}, want, atol=ATOL[device])


def test_fsdp2_fp32_adapters_on_bf16_base_need_no_policy(runs, device):
    _, ranks = runs
    result = ranks["fsdp"][0]
    assert result["mixed_dtypes"] == {"torch.float32"}
    model = build(torch.bfloat16, device=device)
    loss = train(model, batch(WORLD))
    mean_loss = sum(r["mixed_loss"] for r in ranks["fsdp"]) / WORLD  # each rank's loss is on its own rows
    assert mean_loss == pytest.approx(loss, abs=2e-2)  # bf16 base: a different reduction order
    want = {k: v for k, v in lora_weights(model).items() if ".default." in k}
    _assert_same(result["mixed_weights"], want, atol=2e-3)


def test_lorakit_trainer_under_ddp_matches_and_saves_adapter_only(runs, reference, device):
    out, ranks = runs
    _, want = reference
    for result in ranks["trainer"]:
        assert result["wrapper"] == "DistributedDataParallel"
        _assert_same(result["weights"], want, atol=ATOL[device])
    assert not (out / "trainer_adapter" / "model.safetensors").exists()
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), out / "trainer_adapter")
    _assert_same(lora_weights(loaded), {k: v for k, v in want.items() if ".default." in k}, atol=ATOL[device])


# ---------------------------------------------------------------- helpers in one process (no spawn)
def test_decoder_layers_found_from_no_split_modules_or_class():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lorakit.integrations.distributed import decoder_layers

    model = build()
    found = decoder_layers(model)
    assert [type(m) for m in found] == [LlamaDecoderLayer, LlamaDecoderLayer]
    assert decoder_layers(model, LlamaDecoderLayer) == found
    with pytest.raises(ValueError, match=r"No module of class \['Conv2d'\].*LlamaDecoderLayer"):
        decoder_layers(model, torch.nn.Conv2d)
    plain = lorakit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"_no_split_modules.*pass layer_cls"):
        decoder_layers(plain)


def test_gather_selects_what_save_pretrained_writes(tmp_path):
    """Unsharded, the gathered dict holds just the tensors the adapter files need: saving it gives the same files."""
    from safetensors.torch import load_file

    from lorakit.integrations.distributed import gather_adapter_state_dict

    config = lorakit.LoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, bias="lora_only", modules_to_save=["lm_head"]
    )
    model = lorakit.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2))
    gathered = gather_adapter_state_dict(model)
    assert any(".modules_to_save.default." in k for k in gathered)
    assert not any(".embed_tokens." in k or ".mlp." in k for k in gathered)
    model.save_pretrained(tmp_path / "direct")
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    for sub in ("", "other"):
        want = load_file(tmp_path / "direct" / sub / "adapter_model.safetensors")
        got = load_file(tmp_path / "gathered" / sub / "adapter_model.safetensors")
        _assert_same(got, want, atol=0)
    assert gather_adapter_state_dict(model, ["other"]).keys() < gathered.keys()
    with pytest.raises(ValueError, match=r"\['nope'\] do not exist; existing adapters: \['default', 'other'\]"):
        gather_adapter_state_dict(model, ["nope"])
