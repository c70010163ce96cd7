"""Hub ids resolve through huggingface_hub's cache: a fake cache on disk, offline, no network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import lorakit
from models import BUILDERS, make_inputs

REPO = "org/tiny-adapter"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def publish(cache: Path, repo_id: str, folder: Path, ref: str = "main", commit: str | None = None) -> str:
    """Lay ``folder`` out as huggingface_hub caches a download: blobs, a snapshot of symlinks, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def _trained_mlp(seed: int, names=("default", "other")) -> lorakit.PeftModel:
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0", "head"], r=2, init_lora_weights=False)
    )
    for name in names[1:]:
        model.add_adapter(name, lorakit.LoraConfig(target_modules=["lin1"], r=3, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if "lora_" in _:
                param.add_(torch.randn(param.shape, generator=g))
    return model.eval()


def _out(model, adapter: str = "default") -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(**make_inputs("mlp"))


def test_hub_id_from_cache_dir_with_subfolder(tmp_path):
    source = _trained_mlp(0)
    source.save_pretrained(tmp_path / "saved")
    publish(tmp_path / "cache", REPO, tmp_path / "saved")

    loaded = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, cache_dir=tmp_path / "cache")
    loaded.load_adapter(REPO, adapter_name="other", subfolder="other", cache_dir=tmp_path / "cache")
    for adapter in ("default", "other"):
        torch.testing.assert_close(_out(loaded, adapter), _out(source, adapter), atol=0, rtol=0)
    assert loaded.peft_config["other"].target_modules == ["lin1"]


def test_revision_by_branch_and_commit_and_hf_hub_cache(tmp_path, monkeypatch):
    first, second = _trained_mlp(1, names=("default",)), _trained_mlp(2, names=("default",))
    first.save_pretrained(tmp_path / "v1")
    second.save_pretrained(tmp_path / "v2")
    cache = tmp_path / "cache"
    publish(cache, REPO, tmp_path / "v1", ref="main")
    commit = publish(cache, REPO, tmp_path / "v2", ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets at import time

    main = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO)
    branch = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, revision="v2")
    pinned = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, revision=commit)
    torch.testing.assert_close(_out(main), _out(first), atol=0, rtol=0)
    torch.testing.assert_close(_out(branch), _out(second), atol=0, rtol=0)
    torch.testing.assert_close(_out(pinned), _out(second), atol=0, rtol=0)
    assert not torch.equal(_out(main), _out(branch))


def test_bin_only_repo_falls_back_to_bin(tmp_path):
    source = _trained_mlp(3, names=("default",))
    source.save_pretrained(tmp_path / "saved", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]
    publish(tmp_path / "cache", REPO, tmp_path / "saved")
    loaded = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_out(loaded), _out(source), atol=0, rtol=0)


def test_unknown_repo_and_missing_weights_name_the_problem(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(FileNotFoundError, match="org/does-not-exist"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), "org/does-not-exist", cache_dir=cache)
    _trained_mlp(4, names=("default",)).save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "adapter_model.safetensors").unlink()
    publish(cache, REPO, tmp_path / "saved")
    base = BUILDERS["mlp"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors or adapter_model\.bin"):
        lorakit.PeftModel.from_pretrained(base, REPO, cache_dir=cache)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(FileNotFoundError, match="subfolder='nope'"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, subfolder="nope", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"revision='nope'.*no snapshot"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), REPO, revision="nope", cache_dir=cache)


def test_local_folder_with_subfolder(tmp_path):
    source = _trained_mlp(5)
    source.save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "saved" / "other", tmp_path / "other_only")
    loaded = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path, subfolder="other_only")
    torch.testing.assert_close(_out(loaded), _out(source, "other"), atol=0, rtol=0)
