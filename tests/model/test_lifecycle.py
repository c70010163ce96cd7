"""Adapter lifecycle against peft: add, set (several active adapters add up), delete, disable, trainability,
runtime scaling."""

from __future__ import annotations

import warnings

import peft
import peft.helpers
import pytest
import torch

import lorakit
import lorakit.helpers
from models import BUILDERS, make_inputs, output_tensor

EXTRA = {
    "other": dict(target_modules=["k_proj", "q_proj", "down_proj"], r=2, lora_alpha=5),
    "third": dict(target_modules=["v_proj"], r=3, use_rslora=True),
}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def _pair(kind="llama", extra=EXTRA, **kwargs):
    """(lorakit, peft) models with the same adapters and weights."""
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4) | kwargs
    models = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(BUILDERS[kind](), lib.LoraConfig(init_lora_weights=False, **kwargs))
        for name, adapter_kwargs in extra.items():
            model.add_adapter(name, lib.LoraConfig(init_lora_weights=False, **adapter_kwargs))
        models.append(model)
    ours, ref = models
    _perturb(ours)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def _out(model, kind="llama"):
    with torch.no_grad():
        return output_tensor(model(**make_inputs(kind)))


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_several_active_adapters_add_up_like_peft():
    ours, ref = _pair()
    single = _out(ours)
    for names in (["default", "other"], ["other", "third"], ["default", "other", "third"]):
        ours.base_model.set_adapter(names)
        ref.base_model.set_adapter(names)
        assert ours.active_adapters == names
        torch.testing.assert_close(_out(ours), _out(ref), atol=1e-5, rtol=0)
        assert _trainable(ours) == _trainable(ref)
    # the sum is really a sum: (both - base) == (default - base) + (other - base) in the output of one linear layer
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        base = layer.base_layer(x)
        parts = []
        for name in ("default", "other"):
            layer.set_adapter(name)
            parts.append(layer(x) - base)
        layer.set_adapter(["default", "other"])
        torch.testing.assert_close(layer(x) - base, parts[0] + parts[1], atol=1e-6, rtol=0)
    ours.set_adapter("default")
    assert ours.active_adapter == "default"
    torch.testing.assert_close(_out(ours), single, atol=0, rtol=0)


def test_added_adapter_is_inactive_and_frozen_and_names_are_checked():
    ours, ref = _pair(extra={})
    for lib, model in ((lorakit, ours), (peft, ref)):
        model.train()
        model.add_adapter("new", lib.LoraConfig(target_modules=["q_proj"], r=2))
    assert ours.active_adapters == ref.active_adapters == ["default"]
    assert _trainable(ours) == _trainable(ref)
    assert not any(".new." in n for n in _trainable(ours))
    with pytest.raises(ValueError, match=r"'new' already exists; existing adapters: \['default', 'new'\]"):
        ours.add_adapter("new", lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="without dots"):
        ours.add_adapter("a.b", lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"'float' is also an attribute of torch\.nn\.ModuleDict"):
        ours.add_adapter("float", lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['nope'\] not found; existing adapters: \['default', 'new'\]"):
        ours.set_adapter("nope")


def test_delete_adapter_removes_every_trace_and_falls_back_like_peft():
    ours, ref = _pair("bert", extra={}, task_type="SEQ_CLS", target_modules=["query", "value"])
    for lib, model in ((lorakit, ours), (peft, ref)):
        model.add_adapter("other", lib.LoraConfig(task_type="SEQ_CLS", target_modules=["key", "value"], r=2))
        model.set_adapter("other")
    keys_before = set(ours.state_dict())
    ours.delete_adapter("other")
    ref.delete_adapter("other")
    assert ours.active_adapters == ref.active_adapters == ["default"]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert {k for k in keys_before if ".other." not in k} == set(ours.state_dict())
    for module in ours.modules():
        for attr in ("lora_A", "lora_B", "lora_dropout", "modules_to_save", "adapters"):
            assert "other" not in (getattr(module, attr, None) or {}), (type(module).__name__, attr)
    assert list(ours.peft_config) == ["default"]
    assert _trainable(ours) == _trainable(ref.train()) != []
    torch.testing.assert_close(_out(ours, "bert"), _out(ref.eval(), "bert"), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"Adapter zzz does not exist; existing adapters: \['default'\]"):
        ours.delete_adapter("zzz")


def test_disable_adapter_gives_base_outputs_and_restores_even_on_error():
    base_out = _out(BUILDERS["bert"](), "bert")
    ours, _ = _pair("bert", extra={}, task_type="SEQ_CLS", target_modules=["query", "value"])
    ours.train()
    adapted, trainable = _out(ours.eval(), "bert"), _trainable(ours)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    with ours.disable_adapter():
        torch.testing.assert_close(_out(ours, "bert"), base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(ours, "bert"), adapted, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), ours.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(_out(ours, "bert"), adapted, atol=0, rtol=0)
    assert _trainable(ours) == trainable
    # layers that were already disabled stay disabled after the block
    ours.disable_adapter_layers()
    with ours.disable_adapter():
        pass
    torch.testing.assert_close(_out(ours, "bert"), base_out, atol=1e-6, rtol=0)
    ours.enable_adapter_layers()
    torch.testing.assert_close(_out(ours, "bert"), adapted, atol=0, rtol=0)
    assert _trainable(ours) == trainable


def test_disable_adapter_layers_warns_when_biases_train():
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.warns(UserWarning, match="bias='all'"):
        model.disable_adapter_layers()


def test_from_pretrained_trainability_and_mode_like_peft(tmp_path):
    ours, _ = _pair()
    ours.save_pretrained(tmp_path)
    for is_trainable in (False, True):
        loaded = {
            lib.__name__: lib.PeftModel.from_pretrained(
                BUILDERS["llama"]().train(), tmp_path, is_trainable=is_trainable
            )
            for lib in (lorakit, peft)
        }
        ours_l, ref_l = loaded["lorakit"], loaded["peft"]
        assert ours_l.training == ref_l.training == is_trainable
        assert _trainable(ours_l) == _trainable(ref_l)
        assert bool(_trainable(ours_l)) == is_trainable
        assert ours_l.get_nb_trainable_parameters() == ref_l.get_nb_trainable_parameters()
    frozen = lorakit.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    ref = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    frozen.load_adapter(tmp_path / "other", adapter_name="other")
    ref.load_adapter(tmp_path / "other", adapter_name="other")
    assert _trainable(frozen) == _trainable(ref) == []
    frozen.set_adapter("other", inference_mode=True)
    ref.set_adapter("other", inference_mode=True)
    assert _trainable(frozen) == _trainable(ref) == []
    frozen.set_adapter("other")  # as in peft, activating an adapter makes it trainable unless inference_mode
    ref.set_adapter("other")
    assert _trainable(frozen) == _trainable(ref) != []
    assert all(".other." in n for n in _trainable(frozen))


def test_set_requires_grad_like_peft():
    ours, ref = _pair()
    for model in (ours, ref):
        model.set_requires_grad(["other", "third"], requires_grad=True)
        model.set_requires_grad("default", requires_grad=False)
    assert _trainable(ours) == _trainable(ref)
    assert ours.active_adapters == ["default"]
    with pytest.raises(ValueError, match=r"\['nope'\] not found"):
        ours.set_requires_grad("nope")


def test_runtime_scaling_like_peft():
    ours, ref = _pair()
    ours.base_model.set_adapter(["default", "third"])
    ref.base_model.set_adapter(["default", "third"])
    full = _out(ours)
    with lorakit.helpers.rescale_adapter_scale(ours, 0.5), peft.helpers.rescale_adapter_scale(ref, 0.5):
        half = _out(ours)
        torch.testing.assert_close(half, _out(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(ours), full, atol=0, rtol=0)
    with pytest.raises(RuntimeError), ours.rescale_adapter_scale(0.0):
        torch.testing.assert_close(_out(ours), _out(BUILDERS["llama"]()), atol=1e-6, rtol=0)
        raise RuntimeError("leave the block")
    torch.testing.assert_close(_out(ours), full, atol=0, rtol=0)
    with pytest.raises(TypeError, match="float or int"):
        lorakit.helpers.rescale_adapter_scale(ours, "2").__enter__()

    ours.set_adapter_scale("third", 3.0)
    for module in ref.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("third", 3.0)
    ref_layer = ref.base_model.model.model.layers[0].self_attn.v_proj
    assert ours.base_model.model.model.layers[0].self_attn.v_proj.scaling["third"] == pytest.approx(
        ref_layer.scaling["third"]
    )
    torch.testing.assert_close(_out(ours), _out(ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"'nope' is on no LoRA layer; existing adapters: \['default', 'other'"):
        ours.set_adapter_scale("nope", 1.0)
    ours.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        ours.set_adapter_scale("third", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.unmerge_adapter()
