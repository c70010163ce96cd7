"""``lorakit train``'s fast step: the fused loss (on by default, ``--no-fused-loss``) trains the same adapter as the
full-logits loss, in fp32."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl
from safetensors.torch import load_file

from lorakit.cli import demo, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", task_rows(40))


def _adapter(model_dir, data, out, capsys, *flags):
    argv = train_argv(model_dir, data, out, "--r", "4", "--target-modules", "all-linear", "--dropout", "0", *flags)
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    return load_file(out / "adapter_model.safetensors")


def _parse(argv):
    return demo._parse_train([str(a) for a in argv[1:]])


def test_fused_loss_is_on_by_default_and_the_flag_turns_it_off(model_dir, data, tmp_path):
    on = train.train(_parse(train_argv(model_dir, data, tmp_path / "on")))
    off = train.train(_parse(train_argv(model_dir, data, tmp_path / "off", "--no-fused-loss")))
    assert on.model.__dict__.get("_fused_loss") is not None
    assert off.model.__dict__.get("_fused_loss") is None
    batch = {"input_ids": torch.tensor([[1, 40, 41, 42, 43]]), "labels": torch.tensor([[1, 40, 41, 42, 43]])}
    on.model.train()
    off.model.train()
    assert on.model(**batch).logits is None  # the training forward never built the logits
    assert off.model(**batch).logits.shape == (1, 5, on.model.config.vocab_size)
    on.model.eval()
    assert on.model(**batch).logits.shape == (1, 5, on.model.config.vocab_size)  # evaluation gets logits


def test_fused_loss_trains_the_same_adapter_as_full_logits(model_dir, data, tmp_path, capsys):
    fused = _adapter(model_dir, data, tmp_path / "fused", capsys, "--max-steps", "6")
    plain = _adapter(model_dir, data, tmp_path / "plain", capsys, "--max-steps", "6", "--no-fused-loss")
    assert fused.keys() == plain.keys() and len(fused) == 2 * 7 * 2
    # Adam divides each gradient by its own running scale, so a 1e-7 difference in a near-zero gradient entry can
    # move that weight by up to ~lr * 1e-3 over 6 steps; 1e-5 is 3e-4 of the largest B entry (about 0.037)
    for key in fused:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    moved = max((fused[k] - 0).abs().max().item() for k in fused if "lora_B" in k)
    assert moved > 1e-3  # six steps at lr 1e-2 moved B well away from zero: equality is not trivially true
