"""Adding an adapter refuses, before touching the model, what would break it or the model later (issue 14, items 4,
5 and 8, and r=2**40): unsafe names, base-rewriting inits next to existing adapters, layers that do not exist, and
ranks that cannot be allocated. Each refusal leaves the model exactly as it was."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from models import MLP, tiny_llama

X = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


def _mlp_model():
    torch.manual_seed(0)
    return lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before: dict[str, torch.Tensor], adapters: list[str]) -> None:
    assert sorted(model.peft_config) == adapters
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------------- names (item 4)
UNSAFE_NAMES = [
    ("/abs/dir", r"contains '/'"),
    ("sub/dir", r"contains '/'"),
    ("..", "without dots"),
    ("up\\..\\x", "without dots"),
    ("win\\dir", r"contains '\\\\'"),
    ("nul\x00byte", r"contains '\\x00'"),
    ("new\nline", r"contains '\\n'"),
    ("", "non-empty"),
    (None, "non-empty strings without dots, got None"),
]


@pytest.mark.parametrize(("name", "message"), UNSAFE_NAMES)
def test_unsafe_adapter_names_are_refused_when_added(tmp_path, name, message):
    model = _mlp_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.add_adapter(name, lorakit.LoraConfig(target_modules=["lin1"]))
    _assert_unchanged(model, before, ["default"])
    model.save_pretrained(tmp_path / "out")  # and saving still writes only the folder it was given
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]  # fmt: skip


def test_unsafe_name_is_refused_by_get_peft_model():
    with pytest.raises(ValueError, match="contains '/'"):
        lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]), adapter_name="/tmp/evil")


def test_names_with_other_characters_still_work(tmp_path):
    model = _mlp_model()
    model.add_adapter("task-2 (v1)", lorakit.LoraConfig(target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "task-2 (v1)" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------- base-rewriting inits (item 5)
REWRITING = [
    dict(init_lora_weights="pissa"),
    dict(init_lora_weights="pissa_niter_4"),
    dict(init_lora_weights="olora"),
    dict(init_lora_weights="corda"),
    dict(init_lora_weights="loftq", loftq_config=lorakit.LoftQConfig(loftq_bits=4)),
]


@pytest.mark.filterwarnings("ignore:init_lora_weights='corda' without corda_config")
@pytest.mark.parametrize("init", REWRITING, ids=lambda d: d["init_lora_weights"])
def test_base_rewriting_init_next_to_existing_adapters_is_refused(init):
    model = _mlp_model()
    before = _snapshot(model)
    with torch.no_grad():
        out = model(X)
    message = rf"init_lora_weights='{init['init_lora_weights']}', which rewrites the base weights, .*\['default'\]"
    with pytest.raises(ValueError, match=message):
        model.add_adapter("rewriter", lorakit.LoraConfig(target_modules=["lin0"], **init))
    _assert_unchanged(model, before, ["default"])
    with torch.no_grad():
        torch.testing.assert_close(model(X), out, atol=0, rtol=0)


def test_what_peft_does_adding_pissa_next_to_an_adapter():
    """Why lorakit refuses: peft rewrites W under the existing adapter, whose outputs change."""
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    with torch.no_grad():
        out = model(X)
        model.add_adapter("pissa", peft.LoraConfig(target_modules=["lin0"], init_lora_weights="pissa"))
        assert (model(X) - out).abs().max() > 1e-3  # same active adapter "default", different output


def test_base_rewriting_init_as_first_adapter_and_plain_adapters_after_it_work():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights="pissa"))
    with torch.no_grad():
        out = model(X)
    model.add_adapter("plain", lorakit.LoraConfig(target_modules=["lin0", "lin1"]))  # B = 0: changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)


def test_base_rewriting_config_with_empty_factors_is_allowed():
    """low_cpu_mem_usage creates the factors empty (to load saved weights): no init runs, the base stays."""
    model = _mlp_model()
    weight = model.base_model.model.lin0.base_layer.weight.clone()
    model.add_adapter("loaded", lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights="pissa"),
                      low_cpu_mem_usage=True)  # fmt: skip
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, weight)


# ---------------------------------------------------------------------- layers_to_transform range (item 8)
def test_layers_to_transform_out_of_range_names_the_valid_range():
    config = lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 99])
    with pytest.raises(ValueError, match=r"asks for layer\(s\) \[99\] that do not exist: the model has layers 0..1"):
        lorakit.get_peft_model(tiny_llama(), config)
    config = lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 7, 5], layers_pattern="layers")
    with pytest.raises(ValueError, match=r"\[5, 7\] that do not exist: .*layers 0..1 .*layers_pattern='layers'"):
        lorakit.get_peft_model(tiny_llama(), config)
    config = lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=5)  # none exists: nothing selected
    with pytest.raises(ValueError, match=r"layers_to_transform=5 \(layer indices from .*: \[0, 1\]\)"):
        lorakit.get_peft_model(tiny_llama(), config)


def test_layers_to_transform_in_range_adapts_only_those_layers():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, lorakit.layers.LoraLayer)]
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj"]


# ---------------------------------------------------------------------- ranks that cannot be allocated
def test_rank_too_large_to_allocate_is_refused_before_allocating():
    model = _mlp_model()
    before = _snapshot(model)
    message = (
        r"'huge' needs 144.0 TiB for its LoRA factors on 1 module\(s\) but the cpu device has .*'lin1' "
        r"\(weight \(16, 20\)\) at r=1099511627776.* min\(in, out\) = 16"
    )
    with pytest.raises(ValueError, match=message):
        model.add_adapter("huge", lorakit.LoraConfig(target_modules=["lin1"], r=2**40))
    _assert_unchanged(model, before, ["default"])
    with pytest.raises(ValueError, match=r"'big' needs .* TiB"):  # through rank_pattern too
        model.add_adapter("big", lorakit.LoraConfig(target_modules=["lin1"], rank_pattern={"lin1": 2**40}))


def test_rank_above_min_in_out_is_allowed_as_in_peft():
    model = _mlp_model()
    model.add_adapter("wide", lorakit.LoraConfig(target_modules=["lin1"], r=64))  # lin1 is 20 -> 16
    assert model.base_model.model.lin1.lora_A["wide"].weight.shape == (64, 20)
