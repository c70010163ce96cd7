"""Factor casts batched per model call (``lorakit.kernels.factor_casts``): same training as casting per layer, one
multi-tensor copy from the second call on, and never a stale cast (optimizer steps, ``.data`` edits, kept graphs)."""

import pytest
import torch

import lorakit
from lorakit.kernels import factor_casts, shared_inputs
from models import tiny_llama
from training_helpers import sgd_losses


def _model(seed: int = 0):
    base = tiny_llama(seed).to(torch.bfloat16)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(seed)
    return lorakit.get_peft_model(base, config)  # float32 masters on a bfloat16 model (autocast_adapter_dtype)


def _train(model, ids, steps: int, batched: bool, monkeypatch) -> list[float]:
    monkeypatch.setattr(shared_inputs, "ENABLED", False)  # grouped layers round differently in bfloat16
    if not batched:
        monkeypatch.setattr(factor_casts, "_sharded_run", lambda: True)  # the per-layer casts everywhere
    losses = sgd_losses(model, ids, steps)
    monkeypatch.undo()
    return losses


def test_training_equals_per_layer_casts(monkeypatch):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    batched = _train(_model(), ids, 4, True, monkeypatch)
    per_layer = _train(_model(), ids, 4, False, monkeypatch)
    assert batched == per_layer  # bit-identical: the same casts, made at another moment
    assert batched[-1] < batched[0]


def test_second_call_casts_every_factor_in_one_copy(monkeypatch):
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    n_factors = sum(1 for n, p in model.named_parameters() if ".lora_" in n)
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (calls.append(len(dst)), real(dst, src))[1])
    model(input_ids=ids).logits.float().sum().backward()  # first call: nothing remembered yet
    assert calls == []
    model(input_ids=ids).logits.float().sum().backward()
    assert calls == [n_factors]


def test_data_edits_between_calls_are_seen():
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    model.train()
    model(input_ids=ids).logits.sum().backward()
    model.zero_grad()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0)  # bypasses the version counter: a version-keyed cache would miss it
    with torch.no_grad():
        edited = model(input_ids=ids).logits
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids).logits
    model.train()
    out = model(input_ids=ids).logits  # a graph call, batched casts: B is zero now
    torch.testing.assert_close(out.detach(), base)
    torch.testing.assert_close(edited, base)


def test_graph_of_an_earlier_call_keeps_its_casts(monkeypatch):
    monkeypatch.setattr(shared_inputs, "ENABLED", False)  # exact comparison: no bfloat16 regrouping of the sums
    model, reference = _model(), _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids)  # remember the factors
    first = model(input_ids=ids).logits.float().sum()
    with torch.no_grad():
        for param in (p for n, p in model.named_parameters() if "lora_A" in n):
            param.add_(1.0)
    model(input_ids=ids)  # a new call casts the changed factors into new tensors
    first.backward()
    reference(input_ids=ids).logits.float().sum().backward()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        if got.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, msg=name)


@pytest.mark.parametrize("initialised", [False, True])
def test_no_batch_in_a_distributed_run(monkeypatch, initialised):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: initialised)
    seen = []
    with factor_casts.model_call(object.__new__(type("Owner", (), {}))):
        seen.append(factor_casts.current())
    assert (seen[0] is None) == initialised


def test_a_layer_run_many_times_in_one_call_is_batched_once(monkeypatch):
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    layer = model.base_model.model.model.layers[0].mlp
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda x: original(original(x) * 0 + x))  # the MLP runs twice per call
    model(input_ids=ids).logits.float().sum().backward()
    batch = model.base_model.__dict__["_lorakit_factor_casts"]
    n_factors = sum(1 for n, p in model.named_parameters() if ".lora_" in n)
    assert len(batch.previous) == n_factors  # each factor once, although the MLP's ran twice


@pytest.mark.parametrize("dora", [False, True])
def test_inference_mode_calls_then_training(dora):
    """Tensors the fast paths cache or batch while under ``torch.inference_mode`` must not reach a training graph
    ("inference tensors cannot be saved for backward")."""
    base = tiny_llama(0).to(torch.bfloat16)
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    model = lorakit.get_peft_model(base, config)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model(input_ids=ids)
        model(input_ids=ids)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
