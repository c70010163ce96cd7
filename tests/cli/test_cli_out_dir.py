"""``--out`` folders: files the command did not write are never touched without ``--overwrite`` (and merge never
deletes any), and an unwritable ``--out`` is refused before any work (issue 14, items 9 and 10)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_helpers import load_tiny, run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl

import lorakit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("outdir")
    model = tiny_lm_dir(root / "model")
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    lorakit.get_peft_model(load_tiny(model), config).save_pretrained(root / "adapter")
    return {"model": model, "adapter": root / "adapter", "data": write_jsonl(root / "train.jsonl", task_rows(12))}


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _foreign(folder, **named: bytes) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in named.items():
        (folder / name.replace("__", ".")).write_bytes(content)
    return _snapshot(folder)


def test_train_leaves_a_folder_of_foreign_files_alone(files, tmp_path, capsys):
    out = tmp_path / "project"
    before = _foreign(out, train_metrics__json=b'{"mine": 1}', loss__png=b"not a plot", notes__txt=b"keep")
    code, stdout, err = run_cli(train_argv(files["model"], files["data"], out), capsys)
    _one_line(code, err, str(out), "loss.png", "notes.txt", "train_metrics.json", "--overwrite")
    assert _snapshot(out) == before and stdout == ""


def test_train_overwrite_replaces_only_its_own_files(files, tmp_path, capsys):
    out = tmp_path / "project"
    _foreign(out, train_metrics__json=b'{"mine": 1}', notes__txt=b"keep")
    code, _, err = run_cli([*train_argv(files["model"], files["data"], out), "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_bytes() == b"keep"
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 4
    assert (out / "adapter_model.safetensors").is_file()


def test_train_into_an_empty_existing_folder(files, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run_cli(train_argv(files["model"], files["data"], out), capsys)
    assert code == 0, err


def _merge(files, out, *extra):
    return ["merge", "--model", files["model"], "--adapter", files["adapter"], "--out", out, *extra]


def test_merge_never_touches_or_deletes_foreign_files(files, tmp_path, capsys):
    out = tmp_path / "merged"
    before = _foreign(out, tokenizer__json=b"my tokenizer", **{"model-00001-of-00002__safetensors": b"shard 1"})
    _one_line(*run_cli(_merge(files, out), capsys)[::2], "tokenizer.json", "model-00001-of-00002.safetensors")
    assert _snapshot(out) == before
    # --overwrite may replace tokenizer.json, but never deletes the stale shard: it refuses before writing anything
    code, _, err = run_cli(_merge(files, out, "--overwrite"), capsys)
    _one_line(code, err, "model-00001-of-00002.safetensors", "never deletes")
    assert _snapshot(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "no staging folder may be left behind"


def test_merge_overwrite_replaces_a_model_and_keeps_other_files(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert run_cli(_merge(files, out), capsys)[0] == 0
    (out / "notes.txt").write_text("keep")
    (out / "model.safetensors").write_bytes(b"stale")
    code, _, err = run_cli(_merge(files, out, "--overwrite"), capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep"
    AutoModelForCausalLM.from_pretrained(out)  # the stale weights were replaced by the merged ones


def test_train_refuses_an_unwritable_out_before_training(files, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "adapter"
    code, stdout, err = run_cli(train_argv(files["model"], files["data"], out), capsys)
    _one_line(code, err, str(out), "not writable")
    assert "before:" not in stdout, "the check must come before the model is loaded and evaluated"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_refuses_a_read_only_out_folder(files, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, stdout, err = run_cli(train_argv(files["model"], files["data"], out / "sub"), capsys)
    finally:
        out.chmod(0o755)
    _one_line(code, err, "not writable")
    assert "before:" not in stdout


def test_merge_refuses_an_unwritable_out_before_merging(files, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, stdout, err = run_cli(_merge(files, blocker / "merged"), capsys)
    _one_line(code, err, "not writable")
    assert stdout == ""
