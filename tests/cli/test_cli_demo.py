"""The embedded default: the shipped model is pretrained, and the adapter the demo writes loads in peft."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from cli_helpers import run_cli

import lorakit
from lorakit.cli.demo import assets


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets() / "model"
    return (
        folder,
        AutoTokenizer.from_pretrained(folder),
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
    )


def test_shipped_model_is_pretrained(demo_model):
    """Its loss on fresh text of the kind it was trained on is far below a random model's (ln 260 = 5.6)."""
    _folder, tokenizer, load = demo_model
    model = load()
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6
    text = "Month 03 is March. Ada lives in Selby. Where does Ada live? Ada lives in Selby. 12 + 30 = 42."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 1.0
    rows = [json.loads(line) for line in (assets() / "task" / "heldout.jsonl").read_text().splitlines()]
    train = {json.loads(line)["prompt"] for line in (assets() / "task" / "train.jsonl").read_text().splitlines()}
    assert len(rows) == 100 and not train & {r["prompt"] for r in rows}


def test_demo_two_steps_writes_an_adapter_that_peft_loads_with_the_same_outputs(demo_model, tmp_path, capsys):
    folder, tokenizer, load = demo_model
    out = tmp_path / "demo"
    code, stdout, err = run_cli(
        ["demo", "--steps", "2", "--eval-limit", "4", "--out", out, "--progress", "none"], capsys
    )
    assert code == 0, err
    assert "RESULT exact match on 4 held-out dates" in stdout
    assert "4/4 generations identical" in stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["r"] == 8
    leaves = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # all-linear on Llama
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    prompts = ["Date 1999-12-31 in words:", "Date 2024-02-29 in words:"]
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    ref = peft.PeftModel.from_pretrained(load(), out)
    ours = lorakit.PeftModel.from_pretrained(load(), out)
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, ref(**ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours(**ids).logits - load()(**ids).logits).abs().max() > 1e-3
