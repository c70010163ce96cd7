"""A mistyped local name fails at once with "no such folder; did you mean ...?" instead of half a minute of Hub
retries (issue 14, item 13): names that look like local paths (and bare adapter names, which no Hub adapter has)
never go to the Hub, and Hub ids are tried only when the Hub answers."""

from __future__ import annotations

import time

import pytest
import torch
from cli_helpers import load_tiny, run_cli, tiny_lm_dir
from huggingface_hub import constants

import lorakit
from lorakit.cli import sources

FAST = 8.0
"""Seconds: the old behaviour took 28-40 s of retries before its error."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    tiny_lm_dir(root / "model")
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    lorakit.get_peft_model(load_tiny(root / "model"), config).save_pretrained(root / "runs" / "ad_pc")
    return root


@pytest.fixture
def no_hub(monkeypatch, root):
    """A Hub endpoint that refuses connections, and the test's folder as the working directory."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(root)
    sources.reach_hub.cache_clear()


def _fails_fast(argv, capsys, *needles):
    start = time.monotonic()
    code, _, err = run_cli(argv, capsys)
    elapsed = time.monotonic() - start
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert elapsed < FAST, f"took {elapsed:.1f} s"
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_mistyped_adapter_folder_suggests_the_sibling(root, no_hub, capsys, tmp_path, command):
    extra = ["--prompt", "x"] if command == "generate" else ["--out", tmp_path / "merged"]
    argv = [command, "--model", "model", "--adapter", "runs/ad_pcc", *extra]
    _fails_fast(argv, capsys, "'runs/ad_pcc'", "no such folder", "did you mean runs/ad_pc?")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_bare_adapter_name_is_a_local_folder(root, no_hub, capsys, monkeypatch):
    monkeypatch.chdir(root / "runs")
    _fails_fast(
        ["generate", "--model", "../model", "--adapter", "ad_pcc", "--prompt", "x"], capsys, "did you mean ad_pc?"
    )
    _fails_fast(["inspect", "ad_pcc"], capsys, "'ad_pcc'", "no such folder", "did you mean ad_pc?")


def test_hub_id_with_an_unreachable_hub_fails_at_once(root, no_hub, capsys):
    line = _fails_fast(
        ["generate", "--model", "model", "--adapter", "someorg/ad_pcc", "--prompt", "x"], capsys, "someorg/ad_pcc"
    )
    assert "no such folder, not in the Hugging Face cache" in line and "unreachable" in line and "127.0.0.1:9" in line


def test_hub_id_offline_fails_at_once(root, no_hub, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = _fails_fast(["inspect", "someorg/ad_pcc"], capsys, "someorg/ad_pcc", "offline")
    assert "HF_HUB_OFFLINE" in line


def test_mistyped_model_folder_suggests_the_sibling(root, no_hub, capsys):
    _fails_fast(["generate", "--model", "./modle", "--prompt", "x"], capsys, "'./modle'", "did you mean ./model?")
    _fails_fast(["generate", "--model", "runs/modle", "--prompt", "x"], capsys, "no such folder")


def test_bare_model_id_with_an_unreachable_hub_fails_at_once(root, no_hub, capsys):
    _fails_fast(["generate", "--model", "gpt-nonexistent", "--prompt", "x"], capsys, "unreachable", "127.0.0.1:9")


def test_existing_folders_still_load(root, no_hub, capsys):
    code, out, err = run_cli(["generate", "--model", "model", "--adapter", "runs/ad_pc", "--prompt", "Copy a:"], capsys)
    assert code == 0 and out.startswith("[default] Copy a:"), err


def test_suggestions():
    assert sources.close_paths("runs/ad_pcc", ["ad_pc", "other", "zz"]) == ["runs/ad_pc"]
    assert sources.close_paths("rnus/ad_pc", ["runs", "data"], 0) == ["runs/ad_pc"]
    assert sources.close_paths("zzz", ["ad_pc"]) == []
