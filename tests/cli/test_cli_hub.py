"""``--model ORG/NAME`` resolves through the Hugging Face cache offline, and the adapter records the id given."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl
from huggingface_hub import constants

REPO = "org/tiny-lm"


def _publish(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub caches a download: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_from_the_offline_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub"
    _publish(cache, REPO, tiny_lm_dir(tmp_path / "model"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(12))
    code, _, err = run_cli(train_argv(REPO, data, tmp_path / "adapter"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    code, out, err = run_cli(
        ["generate", "--model", REPO, "--adapter", tmp_path / "adapter", "--prompt", "Copy a:"], capsys
    )
    assert code == 0 and out.startswith("[default] Copy a:"), err
    code, _, err = run_cli(train_argv("org/other-model", data, tmp_path / "x"), capsys)
    assert code == 2 and "not in the Hugging Face cache" in err
