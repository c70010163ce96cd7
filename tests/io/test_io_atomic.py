"""An interrupted save leaves the previous adapter intact and no temporary files behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorakit
from models import BUILDERS


def _model(seed: int) -> lorakit.PeftModel:
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False)
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["head"], r=2, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(seed)
    return model


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _half_write_then_fail(real):
    def save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("power cut")

    return save


@pytest.mark.parametrize("safe", [True, False])
def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch, safe):
    _model(1).save_pretrained(tmp_path, safe_serialization=safe)
    before = _snapshot(tmp_path)
    assert "adapter_model.safetensors" in before if safe else "adapter_model.bin" in before
    assert "other/adapter_config.json" in before

    if safe:
        monkeypatch.setattr(safetensors.torch, "save_file", _half_write_then_fail(safetensors.torch.save_file))
    else:
        real = torch.save

        def failing_torch_save(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            Path(f).write_bytes(Path(f).read_bytes()[:100])
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", failing_torch_save)
    with pytest.raises((KeyboardInterrupt, OSError)):
        _model(2).save_pretrained(tmp_path, safe_serialization=safe)
    assert _snapshot(tmp_path) == before  # byte for byte, and nothing new (no temp files)

    monkeypatch.undo()
    reloaded = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path)
    original = _model(1)
    x = torch.randn(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), original.eval()(x), atol=0, rtol=0)


def test_failure_in_second_adapter_keeps_its_old_files(tmp_path, monkeypatch):
    _model(1).save_pretrained(tmp_path)
    before_other = _snapshot(tmp_path / "other")
    real = safetensors.torch.save_file
    calls = []

    def fail_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        _model(2).save_pretrained(tmp_path)
    assert _snapshot(tmp_path / "other") == before_other
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_switching_format_removes_the_other_weights_file(tmp_path):
    _model(1).save_pretrained(tmp_path, safe_serialization=False)
    _model(2).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
