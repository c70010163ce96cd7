"""``lorakit inspect`` on an adapter written by peft: ranks, alphas and update norms equal peft's own numbers."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from cli_helpers import run_cli

from lorakit.cli.inspect_adapter import product_norm
from models import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 32},
        init_lora_weights=False,
        use_rslora=True,
    )
    model = peft.get_peft_model(tiny_llama(), config)
    folder = tmp_path_factory.mktemp("inspect") / "peft-adapter"
    model.save_pretrained(folder)
    deltas = {
        name: (module.get_delta_weight("default"), module.r["default"], module.lora_alpha["default"])
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    return folder, deltas


def test_inspect_json_matches_peft(peft_adapter, tmp_path, capsys):
    folder, deltas = peft_adapter
    plot = tmp_path / "norms.png"
    code, out, err = run_cli(["inspect", folder, "--json", "--plot", plot], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["base_model"] is None and report["use_rslora"] is True
    layers = {layer["module"]: layer for layer in report["layers"]}
    assert set(layers) == set(deltas)
    for name, (delta, r, alpha) in deltas.items():
        layer = layers[name]
        assert (layer["r"], layer["alpha"]) == (r, alpha), name
        assert layer["scaling"] == pytest.approx(alpha / r**0.5)
        assert layer["norm_delta"] == pytest.approx(delta.norm().item(), rel=1e-4), name
        assert layer["kind"] == ("embedding" if "embed" in name else "linear")
    assert layers["model.layers.1.self_attn.q_proj"]["alpha"] == 32
    assert layers["model.layers.0.self_attn.v_proj"]["r"] == 2
    lora_params = sum((d.shape[0] + d.shape[1]) * r for d, r, _ in deltas.values())
    assert report["lora_parameters"] == lora_params
    assert report["parameters"] == lora_params + 96 * 32  # peft also saved the targeted embedding in full
    assert report["other_tensors"] == {"base_model.model.model.embed_tokens.base_layer.weight": [96, 32]}
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_inspect_table_names_every_layer(peft_adapter, capsys):
    folder, deltas = peft_adapter
    code, out, _ = run_cli(["inspect", folder], capsys)
    assert code == 0
    assert "rank_pattern={'v_proj': 2}" in out and "use_rslora" in out
    for name in deltas:
        assert name in out


def test_inspect_gpt2_conv1d_adapter_written_by_peft(tmp_path, capsys):
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=3, target_modules=["c_attn"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    code, out, _ = run_cli(["inspect", tmp_path, "--json"], capsys)
    layers = json.loads(out)["layers"]
    assert code == 0 and len(layers) == 2
    delta = model.base_model.model.transformer.h[0].attn.c_attn.get_delta_weight("default")  # (in, out) for Conv1D
    assert layers[0]["shape"] == [96, 32] and layers[0]["norm_delta"] == pytest.approx(delta.norm().item(), rel=1e-4)


def test_product_norm_equals_the_norm_of_the_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    assert product_norm(b, a) == pytest.approx((b @ a).norm().item(), rel=1e-6)
