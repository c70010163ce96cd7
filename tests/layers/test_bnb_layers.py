"""LoRA on bitsandbytes 4-bit and 8-bit bases (QLoRA): targeting, forward, gradients, saved files, merging, OLoRA
and DoRA through the dequantise / re-quantise hooks, all against peft on the same quantised weights (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402

import lorakit  # noqa: E402
from bnb_helpers import (  # noqa: E402
    DEVICE,
    LLAMA_TARGETS,
    assert_same_training_step,
    load_quantised,
    lora_state,
    save_llama64,
    token_ids,
)
from lorakit.layers.bnb import Linear4bit, Linear8bitLt, dequantise_4bit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' fp16 casts, merge rounding notes
LAYER_CLASS = {"4bit": Linear4bit, "8bit": Linear8bitLt}


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    return save_llama64(tmp_path_factory)


def _pair(path, bits: str, **settings):
    """(ours, peft) LoRA models on the same quantised checkpoint, holding the same adapter weights."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **settings)
    ours = lorakit.get_peft_model(load_quantised(path, bits), lorakit.LoraConfig(**config))
    ref = peft.get_peft_model(load_quantised(path, bits), peft.LoraConfig(**config))
    result = ref.load_state_dict(lora_state(ours), strict=False)
    assert result.unexpected_keys == [] and [k for k in result.missing_keys if "lora_" in k] == []
    return ours, ref


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A")}


def test_import_lorakit_leaves_bitsandbytes_unimported():
    code = "import sys, lorakit; assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_all_linear_wraps_the_quantised_linears_like_peft(llama64_dir, bits):
    ours, ref = _pair(llama64_dir, bits)
    layers = _lora_layers(ours)
    assert sorted(layers) == sorted(_lora_layers(ref))
    assert {n.rsplit(".", 1)[-1] for n in layers} == LLAMA_TARGETS
    assert all(type(m) is LAYER_CLASS[bits] for m in layers.values())
    assert all(type(m.get_base_layer()).__module__.startswith("bitsandbytes") for m in layers.values())
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_forward_and_gradients_match_peft(llama64_dir, bits):
    ours, ref = _pair(llama64_dir, bits, lora_dropout=0.0)
    ids = token_ids()
    assert_same_training_step(ours, ref, ids)
    ours.eval()
    ref.eval()
    with torch.no_grad():  # the inference path (bitsandbytes may repack 4-bit weights for the CPU here)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)


def test_adapter_term_dtype_reference_and_fast_path(llama64_dir):
    """bf16 activations, float32 adapter. The reference path computes the term in float32 and casts it back, as
    PEFT; the fast path computes it in bf16 (factors cast, never x), within bf16 rounding of the float32 result."""
    model = load_quantised(llama64_dir, "4bit", bnb_4bit_compute_dtype=torch.bfloat16)
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 64).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        base = layer.base_layer(x)
        term = layer._reference_term("default", x)
        with lorakit.kernels.use_reference():
            reference = layer(x)
        fast = layer(x)
    assert reference.dtype == fast.dtype == torch.bfloat16
    torch.testing.assert_close(reference, base + term.to(torch.bfloat16), atol=0, rtol=0)
    exact = base.float() + term
    assert not torch.equal(fast, reference)  # the fast path really ran, in bf16
    # bf16 rounding (2**-8 relative) of A, B, h = x A^T, the product and the sum: at most 4 roundings of the term's
    # absolute magnitudes, one of the result
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = (x.float().abs() @ a.abs().t() @ b.abs().t()) * layer.scaling["default"]
    assert ((fast.float() - exact).abs() <= 4 * 2**-8 * magnitude + 2**-8 * exact.abs()).all()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_saved_adapters_load_both_ways(llama64_dir, tmp_path, bits):
    ours, ref = _pair(llama64_dir, bits)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    saved_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    saved_ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert sorted(saved_ours) == sorted(saved_ref)
    assert all(torch.equal(saved_ours[k], saved_ref[k]) for k in saved_ref)
    ids = token_ids()
    loaded_by_peft = peft.PeftModel.from_pretrained(load_quantised(llama64_dir, bits), tmp_path / "ours").eval()
    loaded_by_us = lorakit.PeftModel.from_pretrained(load_quantised(llama64_dir, bits), tmp_path / "ref").eval()
    ours.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_by_peft(ids).logits, ours(ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded_by_us(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)


def _quantisation_bound(layer, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |x @ (Q(V) - V)^T| for the layer's quantiser Q and the (out, in) matrix V.

    4-bit: half the largest gap between neighbouring codes times the block's absmax. 8-bit: half a step of the
    row's int8 grid plus float16 rounding of V (bitsandbytes quantises from float16), and of the CPU matmul."""
    if isinstance(layer, Linear4bit):
        state = layer.get_base_layer().weight.quant_state
        half_gap = state.code.float().sort().values.diff().max() / 2
        blocks = target.reshape(-1, state.blocksize)
        error = (half_gap * blocks.abs().amax(dim=1, keepdim=True)).expand_as(blocks).reshape(target.shape)
    else:
        error = target.abs().amax(dim=1, keepdim=True) / 254 + target.abs() * 2**-10
    return x.abs() @ error.T + (x.abs() @ target.abs().T) * 2**-10 + 1e-5


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_merge_requantises_within_the_quantisation_error(llama64_dir, bits):
    ours, _ = _pair(llama64_dir, bits)
    ours.train()  # bitsandbytes' plain dequantising matmul on CPU
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features).half().float().to(DEVICE)
    before = layer.base_weight_2d()
    target = before + layer.get_delta_weight("default")
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.merged and type(layer.get_base_layer().weight).__name__ in ("Params4bit", "Int8Params")
    assert (merged - unmerged).abs().max() > 0  # re-quantisation really happened
    assert ((merged - unmerged).abs() <= _quantisation_bound(layer, target, x)).all()
    layer.unmerge()
    restored = layer.base_weight_2d()
    assert ((restored - before).abs() <= 2 * (target - layer.base_weight_2d()).abs().max() + 1e-6).all()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_merge_and_unload_equals_peft(llama64_dir, bits):
    ours, ref = _pair(llama64_dir, bits)
    ours.train()
    ref.train()  # peft's merge reads the standard 4-bit layout, which CPU inference may repack
    merged_ours = ours.merge_and_unload()
    merged_ref = ref.merge_and_unload()
    assert not any(isinstance(m, lorakit.LoraLayer) for m in merged_ours.modules())
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(ids).logits, merged_ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="bitsandbytes repacks 4-bit weights on CPUs only")
def test_merge_after_cpu_inference_reads_the_repacked_weight(llama64_dir):
    """bitsandbytes repacks 4-bit weights in place on the first no-grad forward on AVX512-BF16 CPUs (absmax kept
    in bfloat16); merging afterwards must dequantise the repacked layout, not misread it."""
    ours, _ = _pair(llama64_dir, "4bit")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_weight_2d()
    ours.eval()
    with torch.no_grad():
        ours(token_ids())
    base = layer.get_base_layer()
    assert getattr(base.weight.quant_state, "packing_format_for_cpu", False) == base.support_avx512bf16_for_cpu
    torch.testing.assert_close(layer.base_weight_2d(), before, atol=0, rtol=2**-8)  # bf16 absmax at most
    target = layer.base_weight_2d() + layer.get_delta_weight("default")
    layer.merge()
    merged = dequantise_4bit(layer.get_base_layer().weight).float()
    assert ((merged - target).abs() <= _quantisation_bound(layer, target, torch.eye(64)).T).all()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_olora_dequantises_and_requantises_like_peft(llama64_dir, bits):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora")
    ours = lorakit.get_peft_model(load_quantised(llama64_dir, bits), lorakit.LoraConfig(**config))
    ref = peft.get_peft_model(load_quantised(llama64_dir, bits), peft.LoraConfig(**config))
    saved_ours, saved_ref = lora_state(ours), lora_state(ref)
    for key in saved_ref:  # lorakit's thin QR of W's first r columns vs peft's full QR: equal up to rounding
        torch.testing.assert_close(saved_ours[key], saved_ref[key], atol=1e-5, rtol=1e-5)
    ids = token_ids()
    ours.train()
    ref.train()  # no CPU repacking of 4-bit weights, which peft's dequantisation would misread
    with torch.no_grad():  # a forward also replaces peft's stale 8-bit row scales (state.SCB) with the new weight's
        ours_logits, ref_logits = ours(ids).logits, ref(ids).logits
    ref_layers = _lora_layers(ref)
    from peft.utils.integrations import dequantize_bnb_weight

    for name, layer in _lora_layers(ours).items():
        base = ref_layers[name].get_base_layer()
        expected = dequantize_bnb_weight(base.weight, getattr(base, "state", None)).float()
        # the residual W - s B A is re-quantised from factors equal up to rounding: the same codes, block scales
        # (absmax) equal up to rounding
        torch.testing.assert_close(layer.base_weight_2d(), expected, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_pissa_on_a_quantised_base_is_refused(llama64_dir):
    with pytest.raises(TypeError, match=r"'pissa'.*float32/float16/bfloat16.*q_proj.*torch.uint8"):
        lorakit.get_peft_model(
            load_quantised(llama64_dir, "4bit"),
            lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
        )


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_dora_on_quantised_bases_matches_peft(llama64_dir, bits):
    ours, ref = _pair(llama64_dir, bits, use_dora=True)
    ids = token_ids()
    ours.train()
    ref.train()
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_mixed_adapter_batch_matches_peft(llama64_dir):
    ours, ref = _pair(llama64_dir, "4bit")
    second = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours.add_adapter("other", lorakit.LoraConfig(**second))
    ref.add_adapter("other", peft.LoraConfig(**second))
    ref.load_state_dict(lora_state(ours), strict=False)
    ours.eval()
    ref.eval()
    ids = token_ids(batch=3)
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, adapter_names=names).logits, ref(ids, adapter_names=names).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_trainable_parameter_counts_match_peft(llama64_dir, storage):
    ours, ref = (
        lib.get_peft_model(
            load_quantised(llama64_dir, "4bit", bnb_4bit_quant_storage=storage),
            lib.LoraConfig(r=4, target_modules="all-linear"),
        )
        for lib in (lorakit, peft)
    )
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
