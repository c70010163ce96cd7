"""LoftQ (arXiv:2310.08659): init_lora_weights="loftq" and replace_lora_weights_loftq against peft's LoftQ on the
same weights and the same bitsandbytes quantiser, the 4-bit round trip of the saved base, and the errors."""

from __future__ import annotations

import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402

import lorakit  # noqa: E402
from bnb_helpers import (  # noqa: E402
    DEVICE,
    load_quantised,
    lora_state,
    save_llama64,
    tiny_llama64,
    token_ids,
)
from bnb_helpers import peft_loftq_on_cpu as _peft_loftq_on_cpu  # noqa: E402
from lorakit.init.loftq import nf4_round_trip  # noqa: E402
from models import ConvNet, EmbedNet, tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    return save_llama64(tmp_path_factory)


@pytest.fixture
def peft_loftq(monkeypatch):
    return _peft_loftq_on_cpu(monkeypatch)


def _loftq_config(bits: int = 4, iters: int = 1, **settings) -> lorakit.LoraConfig:
    settings = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, **settings}
    loftq = lorakit.LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    return lorakit.LoraConfig(init_lora_weights="loftq", loftq_config=loftq, **settings)


def _layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, lorakit.LoraLayer)}


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_equals_peft_on_the_same_weights(peft_loftq, bits, iters):
    original = tiny_llama64()
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if n.endswith(tuple(TARGETS))}
    model = lorakit.get_peft_model(original, _loftq_config(bits, iters))
    for name, layer in _layers(model).items():
        base, lora_a, lora_b = peft_loftq.loftq_init(weights[name], num_bits=bits, reduced_rank=4, num_iter=iters)
        torch.testing.assert_close(layer.get_base_layer().weight, base, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_A["default"].weight, lora_a, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, lora_b, atol=0, rtol=0)
        quantisation_error = (weights[name] - base).norm()
        assert (weights[name] - base - lora_b @ lora_a).norm() < quantisation_error


def test_loftq_model_reloaded_in_4_bits_keeps_its_base_and_beats_plain_quantisation(llama64_dir, tmp_path):
    """The LoftQ workflow: initialise in float, save the adapter and the unloaded (dequantised) base, load the base
    in 4 bits. NF4 maps the LoftQ base onto itself, so the 4-bit model equals the float one, and it is closer to the
    original model than the 4-bit model with a zero adapter."""
    ids = token_ids()
    with torch.no_grad():
        expected = tiny_llama64().to(DEVICE)(ids).logits
    model = lorakit.get_peft_model(tiny_llama64().to(DEVICE), _loftq_config(target_modules="all-linear")).train()
    with torch.no_grad():
        loftq_logits = model(ids).logits
    float_bases = {n: m.get_base_layer().weight.detach().clone() for n, m in _layers(model).items()}
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "base")
    with pytest.raises(TypeError, match=r"already quantised.*low_cpu_mem_usage=True"):
        lorakit.PeftModel.from_pretrained(load_quantised(tmp_path / "base", "4bit"), tmp_path / "adapter")
    quantised = lorakit.PeftModel.from_pretrained(
        load_quantised(tmp_path / "base", "4bit"), tmp_path / "adapter", low_cpu_mem_usage=True
    )
    assert sorted(_layers(quantised)) == sorted(float_bases)
    for name, layer in _layers(quantised).items():
        torch.testing.assert_close(layer.base_weight_2d(), float_bases[name], atol=1e-7, rtol=0)
    plain = load_quantised(llama64_dir, "4bit").train()
    quantised.train()
    with torch.no_grad():
        torch.testing.assert_close(quantised(ids).logits, loftq_logits, atol=1e-5, rtol=0)
        assert (quantised(ids).logits - expected).abs().mean() < (plain(ids).logits - expected).abs().mean()


def test_loftq_on_conv1d_quantises_the_stored_layout():
    """GPT-2's Conv1D stores (in, out); the base is quantised in that layout (as it will be when loaded in 4 bits)
    while A (r, in) and B (out, r) fit the (out, in) residual."""
    original = tiny_gpt2()
    weight = original.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    config = lorakit.LoraConfig(
        r=4, target_modules=["c_attn"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4}, fan_in_fan_out=True
    )
    layer = lorakit.get_peft_model(original, config).base_model.model.transformer.h[0].attn.c_attn
    base = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(base, nf4_round_trip(weight), atol=0, rtol=0)
    torch.testing.assert_close(nf4_round_trip(base), base, atol=1e-7, rtol=0)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert lora_a.shape == (4, weight.shape[0]) and lora_b.shape == (weight.shape[1], 4)
    assert (weight.T - base.T - lora_b @ lora_a).norm() < (weight - base).norm()


def test_replace_lora_weights_loftq_equals_peft_and_reduces_the_error(llama64_dir, peft_loftq):
    config = dict(r=8, lora_alpha=8, target_modules="all-linear")
    ours = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), lorakit.LoraConfig(**config)).train()
    ref = peft.get_peft_model(load_quantised(llama64_dir, "4bit"), peft.LoraConfig(**config)).train()
    full = tiny_llama64()
    ids = token_ids()
    with torch.no_grad():
        expected = full(ids).logits
        error_before = (ours(ids).logits - expected).abs().mean()
    seen = []
    lorakit.replace_lora_weights_loftq(ours, callback=lambda model, name: seen.append(name) or True)
    peft_loftq.replace_lora_weights_loftq(ref, model_path=str(llama64_dir))
    assert seen == [n for n in _layers(ours)] and seen[0] == "model.layers.0.self_attn.q_proj"
    saved_ours, saved_ref = lora_state(ours), lora_state(ref)
    assert sorted(saved_ours) == sorted(saved_ref)
    for key, value in saved_ref.items():
        torch.testing.assert_close(saved_ours[key], value, atol=0, rtol=0)
    with torch.no_grad():
        assert (ours(ids).logits - expected).abs().mean() < 0.9 * error_before


def test_replace_lora_weights_loftq_callback_rolls_back_rejected_layers(llama64_dir):
    model = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    before = {k: v.clone() for k, v in lora_state(model).items()}
    lorakit.replace_lora_weights_loftq(model, model_path=llama64_dir, callback=lambda m, name: "v_proj" not in name)
    after = lora_state(model)
    for key, value in before.items():
        unchanged = torch.equal(after[key], value)
        assert unchanged == (".v_proj." in key), key


def test_replace_lora_weights_loftq_reads_sharded_checkpoints(llama64_dir, tmp_path):
    tiny_llama64().save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    config = lorakit.LoraConfig(r=4, target_modules=TARGETS)
    sharded = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), config)
    single = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), config)
    lorakit.replace_lora_weights_loftq(sharded, model_path=tmp_path)
    lorakit.replace_lora_weights_loftq(single, model_path=llama64_dir / "model.safetensors")
    expected = lora_state(single)
    assert all(torch.equal(v, expected[k]) for k, v in lora_state(sharded).items())


def test_replace_lora_weights_loftq_errors(llama64_dir, tmp_path):
    eight_bit = lorakit.get_peft_model(load_quantised(llama64_dir, "8bit"), lorakit.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"bitsandbytes Linear4bit.*has none.*Linear8bitLt"):
        lorakit.replace_lora_weights_loftq(eight_bit)
    model = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), lorakit.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"no adapter 'other'; it has: default"):
        lorakit.replace_lora_weights_loftq(model, adapter_name="other")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path)


def test_loftq_refuses_layers_it_cannot_quantise():
    config = dict(r=2, init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match=r"'loftq' cannot initialise layer 'emb' of kind 'embedding'; it supports"):
        lorakit.get_peft_model(EmbedNet(), lorakit.LoraConfig(target_modules=["emb"], **config))
    with pytest.raises(ValueError, match=r"'loftq' cannot initialise layer 'conv2d' of kind 'conv'"):
        lorakit.get_peft_model(ConvNet(), lorakit.LoraConfig(target_modules=["conv2d"], **config))


def test_loftq_bits_errors(llama64_dir):
    with pytest.raises(ValueError, match=r"loftq_bits must be 2, 4 or 8, got 3"):
        lorakit.LoftQConfig(loftq_bits=3)
    with pytest.raises(ValueError, match=r"loftq_bits=2 has no quantiser: bitsandbytes provides 4, 8 bits"):
        lorakit.get_peft_model(tiny_llama64(), _loftq_config(bits=2))
    with pytest.raises(TypeError, match=r"'loftq' quantises .* layer '.*q_proj' is already quantised.*replace_lora"):
        lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), _loftq_config())


def test_missing_bitsandbytes_says_how_to_install(monkeypatch, llama64_dir):
    model = lorakit.get_peft_model(load_quantised(llama64_dir, "4bit"), lorakit.LoraConfig(target_modules=TARGETS))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"LoftQ with loftq_bits=4 needs bitsandbytes.*pip install bitsandbytes"):
        lorakit.get_peft_model(tiny_llama64(), _loftq_config())
    with pytest.raises(ImportError, match=r"replace_lora_weights_loftq needs bitsandbytes.*pip install bitsandbytes"):
        lorakit.replace_lora_weights_loftq(model)
