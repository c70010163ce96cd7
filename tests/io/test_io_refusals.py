"""What save_pretrained and the loaders refuse (issue 14 items 2 and 3, and the "clear errors" on adapter files).

2. Saving after merge_and_unload()/unload(), or with no adapter left, would replace a trained adapter on disk by an
   empty one: refused, the folder byte for byte as it was.
3. An adapter file may only fill the adapter being loaded (its LoRA factors, modules_to_save copies, trainable
   tokens, and the base tensors its own config saves): keys landing on other base weights or on another adapter are
   refused by name, the model unchanged.
Bad files: a non-UTF-8 config, a config that is a directory, integer / bool / complex / NaN tensors (refused) and
float8 ones (warned).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from txn_cases import load_version, outputs, save, version_model

import lorakit
from models import BUILDERS


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _state(model: torch.nn.Module) -> dict:
    return {
        "keys": sorted(model.state_dict()),
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "adapters": sorted(getattr(model, "peft_config", {})),
    }


def _assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = _state(model)
    assert before["keys"] == after["keys"] and before["adapters"] == after["adapters"]
    for key, value in before["values"].items():
        assert torch.equal(value, after["values"][key]), key


# ---------------------------------------------------------------- item 2: never save an empty adapter
@pytest.mark.parametrize("remove", ["merge_and_unload", "unload"])
def test_save_after_the_adapter_was_merged_away_is_refused(tmp_path, remove):
    save("A", tmp_path)
    before = _snapshot(tmp_path)
    model = version_model("A")
    getattr(model, remove)()
    with pytest.raises(ValueError, match=rf"Adapter 'default' has no tensors.*{remove}|Adapter 'default' has no"):
        model.save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before
    assert load_version(tmp_path) == "A"


def test_save_with_every_adapter_deleted_is_refused(tmp_path):
    model = version_model("A")
    model.delete_adapter("default")
    with pytest.raises(ValueError, match=r"no adapter to save to .*new.*all were deleted"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="no adapter to save"):
        version_model("A").save_pretrained(tmp_path / "new", selected_adapters=[])


# ---------------------------------------------------------------- item 3: a file fills only its own adapter
def _two_adapter_model() -> lorakit.PeftModel:
    model = version_model("A")
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False))
    return model


def _with_extra(folder: Path, extra: dict[str, torch.Tensor]) -> Path:
    """The saved adapter plus ``extra`` tensors, its record of the config kept (only the keys are hostile)."""
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    save_file(tensors | extra, str(weights), metadata=metadata)
    return folder


HOSTILE = {
    "base_weight": ("base_model.model.head.weight", (4, 16), r"base-model tensors.*head\.weight"),
    "base_layer": ("base_model.model.lin0.base_layer.weight", (20, 10), r"base-model tensors.*lin0\.base_layer"),
    "other_adapter": (
        "base_model.model.lin0.lora_B.other.weight",
        (20, 2),
        r"tensors of other adapters.*lin0\.lora_B\.other\.weight' \(adapter 'other'\)",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_keys_outside_the_loaded_adapter_are_refused_by_name(tmp_path, case):
    key, shape, message = HOSTILE[case]
    save("A", tmp_path)
    folder = _with_extra(tmp_path, {key: torch.full(shape, 9.0)})
    model = _two_adapter_model()
    before = _state(model)
    with pytest.raises(ValueError, match=rf"may only fill the tensors of adapter 'second'.*{message}"):
        model.load_adapter(folder, "second")
    _assert_unchanged(before, model)
    base = BUILDERS["mlp"]()
    base_before = _state(base)
    # a bare base model has no adapter 'other': that key has no place at all there
    bare = r"no place for.*lin0\.lora_B\.other" if case == "other_adapter" else "may only fill .* adapter 'default'"
    with pytest.raises(ValueError, match=bare):
        lorakit.PeftModel.from_pretrained(base, folder)
    _assert_unchanged(base_before, base)


def test_embeddings_saved_on_request_for_an_unchanged_vocabulary_are_refused(tmp_path):
    """save_embedding_layers=True writes the base embeddings even when nothing resized them; loading them back would
    overwrite the base model's own, so they are refused as any base weight the adapter's config does not save."""
    from models import tiny_llama

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=r"2 base-model tensors .*lm_head\.weight.*save_embedding_layers=True"):
        lorakit.PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(before, base)


def test_set_peft_model_state_dict_refuses_another_adapters_keys():
    model = _two_adapter_model()
    before = _state(model)
    hostile = lorakit.get_peft_model_state_dict(model)
    hostile["base_model.model.lin0.lora_A.other.weight"] = torch.ones(2, 10)
    with pytest.raises(ValueError, match=r"lin0\.lora_A\.other\.weight' \(adapter 'other'\)"):
        lorakit.set_peft_model_state_dict(model, hostile)
    _assert_unchanged(before, model)


def test_base_tensors_the_adapter_itself_saves_still_load(tmp_path):
    config = lorakit.LoraConfig(target_modules=["lin0"], r=2, bias="all", init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    with torch.no_grad():
        model.base_model.model.head.bias.add_(1.0)  # bias="all" saves every bias, and loading restores them
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path)
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)


# ---------------------------------------------------------------- bad adapter files
def test_a_config_that_is_not_utf8_is_named(tmp_path):
    save("A", tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"r": 2, "lora_alpha": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"{path}.* is not UTF-8"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path)
    with pytest.raises(ValueError, match=rf"{path}.* is not UTF-8"):
        lorakit.LoraConfig.from_pretrained(tmp_path)


def test_a_config_that_is_a_directory_is_named(tmp_path):
    save("A", tmp_path)
    path = tmp_path / "adapter_config.json"
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"{path} is a directory"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path)


BAD_VALUES = {
    "int64": (lambda t: t.round().to(torch.int64), r"not floating point: .*lora_A.weight \(int64\)"),
    "bool": (lambda t: t > 0, r"not floating point: .*\(bool\)"),
    "complex": (lambda t: t.to(torch.complex64), r"not floating point: .*\(complex64\)"),
    "nan": (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), r"NaN or infinite values in 1 tensors"),
    "inf": (lambda t: t.index_fill(0, torch.tensor([1]), float("inf")), r"NaN or infinite values in 1 tensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_tensors_an_adapter_cannot_hold_are_refused(tmp_path, case):
    change, message = BAD_VALUES[case]
    save("A", tmp_path)
    key = "base_model.model.lin0.lora_A.weight"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        original = fh.get_tensor(key)
    folder = _with_extra(tmp_path, {key: change(original)})
    model = _two_adapter_model()
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(folder, "second")
    _assert_unchanged(before, model)


def test_float8_tensors_load_with_a_warning(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    save("A", tmp_path)
    key = "base_model.model.lin0.lora_A.weight"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        original = fh.get_tensor(key)
    folder = _with_extra(tmp_path, {key: original.to(torch.float8_e4m3fn)})
    with pytest.warns(UserWarning, match=r"stores 1 tensors in float8 .*lin0\.lora_A\.weight"):
        model = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), folder)
    expected = original.to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(model.base_model.model.lin0.lora_A["default"].weight, expected, atol=0, rtol=0)


def test_refusals_do_not_touch_a_second_copy(tmp_path):
    """The checks read; they never rewrite the folder they refuse."""
    save("A", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_bytes(b"\xff")
    before = _snapshot(tmp_path / "b")
    with warnings.catch_warnings(), pytest.raises(ValueError):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path / "b")
    assert _snapshot(tmp_path / "b") == before
