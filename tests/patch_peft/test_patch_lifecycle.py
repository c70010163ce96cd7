"""Everything peft does keeps working while patched (merge, add / switch / disable adapters, save, copy, pickle),
unpatch restores peft exactly, and bad input or another peft version gets a clear answer."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from peft_cases import assert_close, count_fast_paths, lora_layer_count, pair, peft_model, tokens

import lorakit
from lorakit.patch_peft import versions
from lorakit.patch_peft.patched_class import is_patched


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_unmerge_while_patched(monkeypatch):
    patched, reference = pair(use_dora=True)
    patched.eval(), reference.eval()
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        for model in (patched, reference):
            model.merge_adapter()
        assert_close(_logits(patched, ids), _logits(reference, ids))
        assert hits.fused == 0  # merged layers: peft's forward (the base layer)
        for model in (patched, reference):
            model.unmerge_adapter()
        assert_close(_logits(patched, ids), _logits(reference, ids))
    assert hits.fused == lora_layer_count(patched)


def test_merge_and_unload_gives_the_same_model():
    patched, reference = pair()
    ids = tokens()
    merged = patched.merge_and_unload()
    assert not any(is_patched(m) for m in merged.modules())
    assert_close(_logits(merged, ids), _logits(reference.merge_and_unload(), ids))


def test_add_switch_and_disable_adapters_while_patched(monkeypatch):
    patched, reference = pair()
    patched.eval(), reference.eval()
    ids = tokens()
    for model in (patched, reference):
        torch.manual_seed(4)
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with count_fast_paths(monkeypatch) as hits:
        assert_close(_logits(patched, ids), _logits(reference, ids))  # "default" still active
        for model in (patched, reference):
            model.set_adapter("second")
        assert_close(_logits(patched, ids), _logits(reference, ids))
        # "second" is on q/v of 2 blocks; the other layers hold no active adapter: peft's forward (the base layer)
        assert hits.fused == lora_layer_count(patched) + 4
        for model in (patched, reference):
            model.base_model.set_adapter(["default", "second"])  # several active adapters: peft's forward
        before = hits.fused
        assert_close(_logits(patched, ids), _logits(reference, ids))
        assert hits.fused == before
        with patched.disable_adapter(), reference.disable_adapter():
            assert_close(_logits(patched, ids), _logits(reference, ids))
        patched.base_model.set_adapter("default"), reference.base_model.set_adapter("default")
        patched.delete_adapter("second"), reference.delete_adapter("second")
        assert_close(_logits(patched, ids), _logits(reference, ids))


def test_rescaling_takes_effect(monkeypatch):
    patched, reference = pair()
    ids = tokens()
    _logits(patched, ids)  # caches built
    for model in (patched, reference):
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.layer.LoraLayer):
                module.scale_layer(0.5)
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(3)
    assert_close(_logits(patched, ids), _logits(reference, ids))


def test_unpatch_restores_peft_exactly(tmp_path):
    model = peft_model()
    classes = {n: type(m) for n, m in model.named_modules()}
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens()
    expected = _logits(model, ids)
    lorakit.patch_peft(model)
    assert lorakit.patch_peft(model) is model  # idempotent
    assert list(model.state_dict()) == list(state)  # same keys, same parameter objects' values
    _logits(model, ids)
    lorakit.unpatch_peft(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert not any("_lorakit" in k for m in model.modules() for k in m.__dict__)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), expected)
    with pytest.warns(UserWarning, match="no layer patched"):
        lorakit.unpatch_peft(model)


def test_save_load_copy_and_pickle_while_patched(tmp_path):
    patched, reference = pair()
    ids = tokens()
    _logits(patched, ids)
    patched.save_pretrained(tmp_path / "patched")
    reference.save_pretrained(tmp_path / "reference")
    ours = peft.load_peft_weights(str(tmp_path / "patched"))
    theirs = peft.load_peft_weights(str(tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    copied = copy.deepcopy(patched)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for model in (copied, loaded):
        assert any(is_patched(m) for m in model.modules())
        assert_close(_logits(model, ids), _logits(reference, ids))
    loaded.load_adapter(str(tmp_path / "reference"), adapter_name="again")
    loaded.set_adapter("again")
    assert_close(_logits(loaded, ids), _logits(reference, ids))


def test_transformers_model_with_attached_adapter(monkeypatch):
    from models import tiny_llama

    ours, theirs = tiny_llama(), tiny_llama()
    for model in (ours, theirs):
        torch.manual_seed(2)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.inject_adapter_in_model(config, model)  # (transformers' add_adapter wants peft >= 0.22)
    lorakit.patch_peft(ours)
    ids = tokens()
    with count_fast_paths(monkeypatch) as hits:
        assert_close(_logits(ours, ids), _logits(theirs, ids))
    assert hits.fused == 4


def test_bad_input_is_refused_with_a_clear_error():
    from models import tiny_llama

    with pytest.raises(TypeError, match="expects a peft model"):
        lorakit.patch_peft("model")
    with pytest.raises(ValueError, match=r"no peft LoRA Linear layer .* no peft adapters"):
        lorakit.patch_peft(tiny_llama())
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"peft LoRA layers are \['Embedding'\]"):
        lorakit.patch_peft(model)


def test_other_peft_version_warns_and_missing_attributes_refuse(monkeypatch):
    versions.peft_api.cache_clear()
    monkeypatch.setattr(peft, "__version__", "9.9.9")
    try:
        with pytest.warns(UserWarning, match=r"tested with peft 0\.21\.2; found peft 9\.9\.9"):
            api = versions.peft_api()
    finally:
        versions.peft_api.cache_clear()
    assert api.version == "9.9.9"
    model = peft_model()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    del layer.lora_variant
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"lacks \['lora_variant'\].*nothing was patched"):
        warnings.simplefilter("ignore")
        lorakit.patch_peft(model)
    assert not any(is_patched(m) for m in model.modules())


def test_lorakit_imports_without_peft():
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import lorakit\n"
        "assert callable(lorakit.patch_peft)\n"
        "try:\n    lorakit.patch_peft(__import__('torch').nn.Linear(2, 2))\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs peft installed" in out


def test_layers_with_an_instance_forward_are_named():
    model = peft_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.forward = layer.forward  # as accelerate's hooks do: an instance attribute wrapping the old forward
    with pytest.warns(UserWarning, match=r"1 LoRA layers .*layers\.0\.self_attn\.q_proj.*instance-level forward"):
        lorakit.patch_peft(model)


def test_an_error_inside_a_call_closes_its_scope():
    from lorakit.kernels.factor_casts import current
    from lorakit.patch_peft import scope

    patched, reference = pair()
    ids = tokens()

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = patched.base_model.model.model.layers[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        _logits(patched, ids)  # raised after the first block's LoRA layers ran inside the scope
    handle.remove()
    assert current() is None and not scope._LOCAL.__dict__.get("open")
    assert_close(_logits(patched, ids), _logits(reference, ids))
