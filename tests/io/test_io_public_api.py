"""load_peft_weights, device_map on from_pretrained / load_adapter, push_to_hub (commit intercepted), vs peft."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from models import MLP

X = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))


def base() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", safe_serialization=False)
    return tmp_path


def test_load_peft_weights_equals_peft(saved):
    for folder in ("a", "b"):
        ours = lorakit.load_peft_weights(saved / folder, device="cpu")
        theirs = peft.utils.load_peft_weights(str(saved / folder), device="cpu")
        assert sorted(ours) == sorted(theirs) and len(ours) == 4
        for key in ours:
            assert torch.equal(ours[key], theirs[key])
    assert lorakit.load_peft_weights(saved / "a")["base_model.model.lin0.lora_A.weight"].device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )


def test_load_peft_weights_key_mapping_like_peft(saved):
    mapping = {r"^lin0\.": "first."}
    ours = lorakit.load_peft_weights(saved / "a", device="cpu", key_mapping=mapping)
    theirs = peft.utils.load_peft_weights(str(saved / "a"), device="cpu", key_mapping=mapping)
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.first.lora_A.weight" in ours


def test_load_peft_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No adapter_model\.safetensors or adapter_model\.bin"):
        lorakit.load_peft_weights(tmp_path, device="cpu")


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_accepted_like_peft(saved, device_map):
    ours = lorakit.PeftModel.from_pretrained(base(), saved / "a", device_map=device_map)
    theirs = peft.PeftModel.from_pretrained(base(), saved / "a", device_map=device_map)
    torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=1e-6)
    assert not torch.allclose(ours(X), base()(X))
    ours.load_adapter(saved / "b", "other", device_map=device_map, max_memory=None)
    assert "other" in ours.peft_config


def test_device_map_checks(saved):
    with pytest.raises(ValueError, match="device_map='gpu' is not valid; use one of"):
        lorakit.PeftModel.from_pretrained(MLP(), saved / "a", device_map="gpu")
    with pytest.raises(ValueError, match="`offload_dir` or `offload_folder`"):
        lorakit.PeftModel.from_pretrained(MLP(), saved / "a", offload_dir="x", offload_folder="y")
    offloaded = MLP()
    offloaded.hf_device_map = {"lin0": 0, "lin1": "disk", "head": "cpu"}
    with pytest.raises(ValueError, match=r"offloaded by accelerate to \['cpu', 'disk'\]"):
        lorakit.PeftModel.from_pretrained(offloaded, saved / "a", device_map="auto")
    cpu_only = MLP()
    cpu_only.hf_device_map = {"": "cpu"}  # a plain CPU model, not offloading
    lorakit.PeftModel.from_pretrained(cpu_only, saved / "a", device_map="auto")


@pytest.fixture
def commits(monkeypatch):
    """Intercept huggingface_hub's repo creation and commit: no network; returns the recorded calls."""
    calls: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"create_repo": repo_id, **kwargs})
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        calls.append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_commits_the_adapter_files_like_peft(commits, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"]))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["lin1"]))
    theirs.push_to_hub("user/repo")
    ours = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["lin1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is ignored on the way
        result = ours.push_to_hub("user/repo", commit_message="adapters", private=True, tags=["demo"], create_pr=True)
    assert result == "commit-info"
    peft_commit, our_commit = commits[1], commits[3]
    assert commits[2] == {"create_repo": "user/repo", "private": True, "exist_ok": True}
    weights = {k for k in our_commit["files"] if not k.endswith("README.md")}
    assert weights == {k for k in peft_commit["files"] if not k.endswith("README.md")}
    assert (our_commit["commit_message"], our_commit["create_pr"]) == ("adapters", True)
    # the committed files are the saved adapter: they load back in peft with our weights
    for path, data in our_commit["files"].items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(
        state["base_model.model.lin0.lora_A.weight"], ours.base_model.model.lin0.lora_A["default"].weight
    )
    reloaded = peft.PeftModel.from_pretrained(MLP(), tmp_path)
    reloaded.load_adapter(tmp_path / "other", "other")
    assert (
        "demo" in (tmp_path / "README.md").read_text() and "library_name: peft" in (tmp_path / "README.md").read_text()
    )


def test_push_to_hub_selected_adapter_only(commits):
    ours = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["lin1"]))
    ours.push_to_hub("user/repo", selected_adapters=["other"], safe_serialization=False)
    assert {k for k in commits[-1]["files"] if "adapter_" in k} == {
        "other/adapter_config.json",
        "other/adapter_model.bin",
    }
