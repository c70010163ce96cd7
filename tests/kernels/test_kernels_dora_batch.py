"""DoRA factors batched per model call (``lorakit.kernels.dora_batch``): the same training as per-layer factors,
one computation per group of same-shape layers from the second call on, never factors of other tensors."""

import pytest
import torch

import lorakit
from lorakit.kernels import dora_batch, dora_linear, factor_casts
from models import tiny_llama
from training_helpers import sgd_losses


def _model(dtype=torch.float32, seed: int = 0):
    base = tiny_llama(seed, layers=3).to(dtype)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    torch.manual_seed(seed)
    model = lorakit.get_peft_model(base, config)
    with torch.no_grad():  # magnitudes away from the norms, so that k != 1 shows in the outputs
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.5, 1.5, param.numel()).view(param.shape))
    return model


def _train(model, ids, steps: int, batched: bool, monkeypatch) -> list[float]:
    if not batched:
        monkeypatch.setattr(dora_batch, "batched_factors", lambda *args: None)
        monkeypatch.setattr("lorakit.variants.dora.batched_factors", lambda *args: None)
    losses = sgd_losses(model, ids, steps)
    monkeypatch.undo()
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_equals_per_layer_factors(monkeypatch, dtype):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    batched = _train(_model(dtype), ids, 4, True, monkeypatch)
    per_layer = _train(_model(dtype), ids, 4, False, monkeypatch)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # stacked vs single GEMMs: rounding only
    assert batched == pytest.approx(per_layer, rel=tol)
    assert batched[-1] < batched[0]


def test_second_call_computes_each_shape_group_once(monkeypatch):
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    singles, groups = [], []
    real_single, real_group = dora_linear.dora_factors, dora_batch._group_factors
    monkeypatch.setattr(dora_linear, "dora_factors", lambda *a, **k: (singles.append(1), real_single(*a, **k))[1])
    monkeypatch.setattr(dora_batch, "dora_factors", dora_linear.dora_factors)
    monkeypatch.setattr(dora_batch, "_group_factors", lambda m, d: (groups.append(len(m)), real_group(m, d))[1])
    model(input_ids=ids).logits.sum().backward()  # first call: every layer on its own
    assert len(singles) == 21 and groups == []  # 3 layers x 7 linear layers
    singles.clear()
    model(input_ids=ids).logits.sum().backward()
    # 7 linear layers x 3 decoder layers; same (out, in, r): q/o (32x32), k/v (16x32), gate/up (48x32); down alone
    assert singles == [] and sorted(groups) == [3, 6, 6, 6]


def test_factors_of_replaced_tensors_are_not_used():
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids)  # remember the layers
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    new_b = torch.nn.Parameter(torch.randn_like(layer.lora_B["default"].weight))
    layer.lora_B["default"].weight = new_b  # a new tensor object: the batch computed nothing for it
    with torch.no_grad():
        out = model(input_ids=ids).logits
    with torch.no_grad(), lorakit.kernels.use_reference():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_no_batch_outside_a_model_call():
    model = _model()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert factor_casts.current() is None
    assert dora_batch.batched_factors(layer, "default", (), 1.0, torch.float32) is None
