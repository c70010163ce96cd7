"""Adapters cross between peft and lorakit in both directions: same files, same keys, same logits."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from io_cases import CASES, adapter_folder, adapter_names, build, logits, read_saved

import lorakit
from models import BUILDERS

ATOL = 1e-5


def _load_all(lib, kind: str, root, names: list[str]):
    """Load every adapter of a saved folder into a fresh base model with ``lib``'s PeftModel."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Mm]issing.*")
        warnings.filterwarnings("error", message=".*[Uu]nexpected.*")
        model = lib.PeftModel.from_pretrained(BUILDERS[kind](), root)
        for name in names[1:]:
            result = model.load_adapter(adapter_folder(root, name), adapter_name=name)
            missing, unexpected = (
                (result.missing_keys, result.unexpected_keys) if hasattr(result, "missing_keys") else result
            )
            assert [k for k in missing if "lora_" in k] == []
            assert unexpected == []
    return model.eval()


def _compare_logits(ours, ref, kind: str, names: list[str]) -> None:
    for name in names:
        ours.set_adapter(name)
        ref.set_adapter(name)
        torch.testing.assert_close(logits(ours, kind), logits(ref, kind), atol=ATOL, rtol=0)


def _comparable(config: dict) -> dict:
    """PEFT keeps target_modules/modules_to_save as sets (written in hash order, sometimes with repeats);
    ``peft_version`` is the writer's (lorakit writes the peft version it matches, peft its own)."""
    out = dict(config)
    out.pop("peft_version", None)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(out.get(key), list):
            out[key] = set(out[key])
    return out


def _compare_folders(ours_root, ref_root, names: list[str]) -> None:
    for name in names:
        ours_config, ours_tensors = read_saved(adapter_folder(ours_root, name))
        ref_config, ref_tensors = read_saved(adapter_folder(ref_root, name))
        assert sorted(ours_tensors) == sorted(ref_tensors), name
        for key, tensor in ref_tensors.items():
            assert ours_tensors[key].shape == tensor.shape, key
            assert ours_tensors[key].dtype == tensor.dtype, key
        assert _comparable(ours_config) == _comparable(ref_config), name


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_adapter_loads_in_lorakit_and_saves_back_identically(case, tmp_path):
    ref, kind = build(peft, case)
    names = adapter_names(case)
    save_kwargs = CASES[case][3]
    ref.save_pretrained(tmp_path / "peft", **save_kwargs)

    ours = _load_all(lorakit, kind, tmp_path / "peft", names)
    assert not any(p.requires_grad for p in ours.parameters()), "from_pretrained must freeze by default"
    _compare_logits(ours, ref, kind, names)

    ours.save_pretrained(tmp_path / "ours", **save_kwargs)
    _compare_folders(tmp_path / "ours", tmp_path / "peft", names)
    for name in names:
        ours_tensors = read_saved(adapter_folder(tmp_path / "ours", name))[1]
        for key, tensor in read_saved(adapter_folder(tmp_path / "peft", name))[1].items():
            torch.testing.assert_close(ours_tensors[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_saved_adapter_loads_in_peft(case, tmp_path):
    ours, kind = build(lorakit, case, seed=5)
    names = adapter_names(case)
    save_kwargs = CASES[case][3]
    ours.save_pretrained(tmp_path / "ours", **save_kwargs)
    ref = _load_all(peft, kind, tmp_path / "ours", names)
    _compare_logits(ours, ref, kind, names)
    # peft's own save of the same configuration has the same files, keys and config
    peft_built, _ = build(peft, case, seed=5)
    peft_built.save_pretrained(tmp_path / "peft", **save_kwargs)
    _compare_folders(tmp_path / "ours", tmp_path / "peft", names)
