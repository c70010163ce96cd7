"""CudaGraphStep: the captured step equals eager forward + backward (losses, gradients, AdamW updates), on CUDA as a
replayed graph and on the CPU as its eager fallback; bad batches and changed models raise errors that say why."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.integrations.cuda_graphs import CudaGraphStep
from models import tiny_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device: str, use_dora: bool = False, dropout: float = 0.0):
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora, lora_dropout=dropout
    )
    return lorakit.get_peft_model(tiny_llama(), config).to(device).train()


def _batch(seed: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _eager_grads(model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("device", DEVICES)
def test_step_matches_eager_training(device, use_dora):
    model = _model(device, use_dora)
    reference = copy.deepcopy(model)
    step = CudaGraphStep(model, _batch(0, device))
    assert (step.graph is not None) == (device == "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(1, 4):
        batch = _batch(seed, device)
        loss = step(batch)
        grads = _grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)  # the step puts its gradient tensors back next call
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        ref_grads = _grads(reference)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)
        _close(grads, ref_grads)
    _close([p.detach() for p in model.parameters()], [p.detach() for p in reference.parameters()])
    assert loss.item() != pytest.approx(step(_batch(1, device)).item())  # trained: the first batch's loss moved


@pytest.mark.parametrize("device", DEVICES)
def test_each_call_replaces_the_gradients_by_default(device):
    model = _model(device)
    step = CudaGraphStep(model, _batch(0, device))
    step(_batch(1, device))
    step(_batch(2, device))  # no zero_grad in between: still the second batch's gradients alone
    got = _grads(model)
    _close(got, _eager_grads(model, _batch(2, device)))


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_grad_adds_and_none_counts_as_zero(device):
    model = _model(device)
    first, second, third = (_eager_grads(model, _batch(seed, device)) for seed in (1, 2, 3))
    step = CudaGraphStep(model, _batch(0, device), accumulate_grad=True)
    model.zero_grad(set_to_none=True)
    step(_batch(1, device))
    step(_batch(2, device))
    _close(_grads(model), [a + b for a, b in zip(first, second)])
    model.zero_grad(set_to_none=True)
    step(_batch(3, device))
    _close(_grads(model), third)
    model.zero_grad(set_to_none=False)  # zeros in place: the same tensors, now zero
    step(_batch(1, device))
    _close(_grads(model), first)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_an_input_that_requires_grad(device):
    """The frozen floor of the benchmarks: no trainable parameter, backward to the input embeddings."""
    base = tiny_llama().to(device).train().requires_grad_(False)
    ids = _batch(1, device)["input_ids"]
    embeds = base.get_input_embeddings()(ids).detach()
    step = CudaGraphStep(base, {"inputs_embeds": embeds.requires_grad_(True), "labels": ids})
    step({"inputs_embeds": embeds, "labels": ids})
    leaf = embeds.detach().clone().requires_grad_(True)
    base(inputs_embeds=leaf, labels=ids).loss.backward()
    torch.testing.assert_close(step.input_grad("inputs_embeds"), leaf.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="input_ids"):
        step.input_grad("input_ids")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_batches_name_the_entry(device):
    model = _model(device)
    step = CudaGraphStep(model, {**_batch(0, device), "use_cache": False})
    ids = _batch(1, device)["input_ids"]
    with pytest.raises(ValueError, match=r"missing \['use_cache'\], unexpected \['attention_mask'\]"):
        step({"input_ids": ids, "labels": ids, "attention_mask": ids})
    with pytest.raises(ValueError, match=r"'input_ids' is \(2, 6\).*captured with \(2, 12\)"):
        step({"input_ids": ids[:, :6], "labels": ids, "use_cache": False})
    with pytest.raises(ValueError, match="'use_cache' is True; the step was captured with False"):
        step({"input_ids": ids, "labels": ids, "use_cache": True})
    with pytest.raises(ValueError, match="no scalar loss; put the labels in the batch"):
        CudaGraphStep(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="no parameter with requires_grad=True and no batch entry requires grad"):
        CudaGraphStep(tiny_llama().requires_grad_(False), _batch(0, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_changed_model_raises(device):
    model = _model(device)
    step = CudaGraphStep(model, _batch(0, device))
    model.eval()
    with pytest.raises(RuntimeError, match="captured in train mode"):
        step(_batch(1, device))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable[3].requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"Trainable parameter 3 .* frozen, moved or replaced"):
        step(_batch(1, device))


def test_multi_process_runs_are_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="with 2 processes, DDP's or FSDP's per-step synchronisation"):
        CudaGraphStep(_model("cpu"), _batch(0, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_dropout_draws_fresh_masks_on_every_replay():
    model = _model("cuda", dropout=0.5)
    step = CudaGraphStep(model, _batch(0, "cuda"))
    losses = {step(_batch(1, "cuda")).item() for _ in range(4)}
    assert len(losses) == 4  # the same batch, four different dropout masks
    model.eval()
    eval_step = CudaGraphStep(model, _batch(0, "cuda"))
    losses = {eval_step(_batch(1, "cuda")).item() for _ in range(3)}
    assert len(losses) == 1  # eval: no dropout, the same loss every replay
