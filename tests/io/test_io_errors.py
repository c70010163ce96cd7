"""Bad input while loading: each case raises a message that names the problem, and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from io_cases import strip_config_record

import lorakit
from models import BUILDERS

X = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


def _saved(tmp_path, name="saved", **kwargs):
    config = dict(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False) | kwargs
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(**config))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _edit_config(folder, **changes):
    """Change the config by hand and drop the weights' record of their config, as a folder assembled by another
    tool would be (with the record, the loader refuses the edited folder first: see test_io_transaction)."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    strip_config_record(folder)


def _fingerprint(model: torch.nn.Module) -> dict:
    """Everything a failed load must not change: structure, tensors, grad flags, mode, adapters."""
    return {
        "repr": repr(model),
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "adapters": sorted(getattr(model, "peft_config", {})),
        "active": list(getattr(model, "active_adapters", [])),
    }


def _assert_same(before: dict, after: dict) -> None:
    state_before, state_after = before.pop("state"), after.pop("state")
    assert before == after
    assert state_before.keys() == state_after.keys()
    for key, value in state_before.items():
        assert torch.equal(value, state_after[key]), key


def _peft_model_with_head():
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False)
    )
    return model.train()


def test_shape_mismatch_names_first_key_and_both_shapes(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, r=2)
    with pytest.raises(ValueError, match=r"lin0\.lora_A.*\(4, 10\).*\(2, 10\)"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), folder)


@pytest.mark.parametrize(
    "breakage",
    ["shape", "unexpected_key", "no_config", "truncated", "garbage", "bin_garbage", "other_peft_type", "bad_json"],
)
def test_failed_load_adapter_leaves_model_unchanged(tmp_path, breakage):
    # the new adapter also wraps new layers (lin1, head) and a modules_to_save module, all of which must go again
    folder = _saved(tmp_path, target_modules=["lin1", "head"])
    message = _break(folder, breakage)
    model = _peft_model_with_head()
    before = _fingerprint(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        model.load_adapter(folder, adapter_name="second")
    _assert_same(before, _fingerprint(model))


def test_failed_load_with_modules_to_save_unwraps_again(tmp_path):
    folder = _saved(tmp_path, target_modules=["lin1"], modules_to_save=["head"])
    _edit_config(folder, r=3)
    model = _peft_model_with_head()
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"lin1\.lora_A.*\(4, 20\).*\(3, 20\)"):
        model.load_adapter(folder, adapter_name="second")
    _assert_same(before, _fingerprint(model))
    model.load_adapter(_saved(tmp_path, "good", target_modules=["lin1"], modules_to_save=["head"]), "second")
    assert "second" in model.peft_config


@pytest.mark.parametrize("breakage", ["shape", "truncated", "other_peft_type", "no_config"])
def test_failed_from_pretrained_leaves_base_model_untouched(tmp_path, breakage):
    folder = _saved(tmp_path, modules_to_save=["head"])
    message = _break(folder, breakage)
    base = BUILDERS["mlp"]().train()
    before = _fingerprint(base)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lorakit.PeftModel.from_pretrained(base, folder)
    _assert_same(before, _fingerprint(base))
    assert torch.equal(base(X), BUILDERS["mlp"]()(X))


def _break(folder, breakage: str) -> str:
    """Damage a saved adapter in one way; returns a regex the error message must match."""
    weights = folder / "adapter_model.safetensors"
    if breakage == "shape":
        _edit_config(folder, r=3)
        return r"does not fit.*lora_A.*shape \(4, \d+\).*but \(3, \d+\)"
    if breakage == "unexpected_key":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights)) | {"base_model.model.nowhere.lora_A.weight": torch.zeros(4, 10)}
        save_file(tensors, str(weights))
        return r"no place for.*nowhere\.lora_A"
    if breakage == "no_config":
        (folder / "adapter_config.json").unlink()
        return r"No adapter_config\.json in .*saved.*adapter_model\.safetensors"
    if breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
        return r"corrupt or truncated"
    if breakage == "garbage":
        weights.write_bytes(b"\x00" * 3)
        return r"corrupt or truncated"
    if breakage == "bin_garbage":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(b"not a pickle")
        return r"adapter_model\.bin.*corrupt or truncated"
    if breakage == "other_peft_type":
        _edit_config(folder, peft_type="IA3")
        return r"peft_type='IA3'.*only.*LoRA"
    if breakage == "bad_json":
        (folder / "adapter_config.json").write_text("{not json")
        return r"adapter_config\.json is not valid JSON"
    raise KeyError(breakage)


def test_existing_adapter_name_and_missing_paths_are_named(tmp_path):
    folder = _saved(tmp_path)
    model = _peft_model_with_head()
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"'default' already exists; existing adapters: \['default'\]"):
        model.load_adapter(folder, adapter_name="default")
    _assert_same(before, _fingerprint(model))
    with pytest.raises(FileNotFoundError, match="neither an existing local folder nor a valid Hub repo id"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(FileNotFoundError, match="is a file; expected an adapter folder or a Hub repo id"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), folder / "adapter_config.json")
