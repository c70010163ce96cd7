"""``lorakit train``'s fast step: the fused loss (on by default, ``--no-fused-loss``) and padding-free packed batches
(on by default, ``--no-packing``) train the same adapter as the full-logits loss and padded batches, in fp32; packed
rows give each sequence its own loss; tokens/s count real tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from cli_helpers import load_tiny, run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl
from safetensors.torch import load_file

from lorakit.cli import demo, train
from lorakit.cli.data import IGNORE_INDEX, Encoded, batch_indices, collate
from lorakit.cli.packing import pack, packing_reason, real_tokens, use_packing
from lorakit.cli.trainer import TrainSettings


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


# ---------------------------------------------------------------- padding-free batches (packing)
def _rows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = [1, *torch.randint(4, 100, (n - 1,), generator=generator).tolist()]
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then the completion
        rows.append(Encoded(ids, labels))
    return rows


def test_pack_matches_transformers_flattening_collator():
    from transformers import DataCollatorWithFlattening

    rows = _rows([5, 1, 9, 3])
    ours = pack(rows)
    reference = DataCollatorWithFlattening(return_tensors="pt", return_position_ids=True)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(ours[key], reference[key]), key
    assert real_tokens(ours) == 18 and real_tokens(collate(rows, 0)) == 18


def _per_sequence_losses(logits, labels, lengths):
    """Mean shifted cross-entropy of each sequence, from (1, N, V) packed or (B, T, V) padded logits."""
    losses, start = [], 0
    for i, n in enumerate(lengths):
        row_logits = logits[0, start : start + n] if logits.shape[0] == 1 else logits[i, :n]
        row_labels = labels[0, start : start + n] if labels.shape[0] == 1 else labels[i, :n]
        losses.append(nn.functional.cross_entropy(row_logits[:-1], row_labels[1:], ignore_index=IGNORE_INDEX))
        start += n
    return torch.stack(losses)


@pytest.mark.parametrize("per_sequence", [True, False], ids=["packed_sdpa", "sdpa_block_mask"])
def test_packed_rows_give_each_sequence_its_own_loss(model_dir, per_sequence):
    from lorakit import LoraConfig, get_peft_model

    base = load_tiny(model_dir)
    assert base.config._attn_implementation == "sdpa"
    assert packing_reason(base) is None  # transformers' own SDPA path: a block-diagonal mask
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if per_sequence:  # what lorakit train uses: SDPA once per sequence (integrations.packed_sdpa)
        assert use_packing(model) is None and base.config._attn_implementation == "lorakit_packed_sdpa"
    model.train()  # the training call: a KV cache would make transformers drop the per-sequence mask
    lengths = [17, 4, 30, 9]
    rows = _rows(lengths)
    packed, padded = pack(rows), collate(rows, 0)
    packed_out = model(**packed, use_cache=False)
    padded_out = model(**padded)
    got = _per_sequence_losses(packed_out.logits, packed["labels"], lengths)
    want = _per_sequence_losses(padded_out.logits, padded["labels"], lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)  # same batch mean
    # the same row read as one sequence (positions 0..N-1) is different: the test can tell leaking attention apart
    leaked = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).logits
    assert (_per_sequence_losses(leaked, packed["labels"], lengths) - want).abs().max() > 1e-2


class _Leaky(nn.Module):
    """A 'model' whose outputs mix every earlier token of the row, whatever the position_ids: packing must be off."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="cumulative")
        self.embed = nn.Embedding(50, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.embed(input_ids).cumsum(1))


class _NoPositions(_Leaky):
    def forward(self, input_ids, use_cache=None):
        return SimpleNamespace(logits=self.embed(input_ids))


def test_models_that_do_not_keep_packed_sequences_apart_are_padded():
    reason = packing_reason(_Leaky())
    assert reason and "(cumulative) lets packed sequences see each other" in reason
    assert "does not take position_ids" in packing_reason(_NoPositions())
    settings = TrainSettings(packing=True)
    with pytest.warns(UserWarning, match="packing off, batches padded: its attention"):
        train._check_packing(_Leaky(), settings)
    assert settings.packing is False


def test_packed_training_gives_the_padded_adapter_and_counts_real_tokens(model_dir, data, tmp_path, capsys):
    packed = _adapter(model_dir, data, tmp_path / "packed", capsys, "--max-steps", "6")
    padded = _adapter(model_dir, data, tmp_path / "padded", capsys, "--max-steps", "6", "--no-packing")
    assert packed.keys() == padded.keys()
    for key in packed:  # the same tolerance and reason as the fused-loss test above
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-5, msg=key)
    metrics = [json.loads((tmp_path / d / "train_metrics.json").read_text()) for d in ("packed", "padded")]
    assert metrics[0]["settings"]["packing"] is True and metrics[1]["settings"]["packing"] is False
    run = train.prepare(_parse(train_argv(model_dir, data, tmp_path / "count")))
    chosen = [batch_indices(len(run.train_rows), step, 4, 0) for step in range(6)]
    real = sum(len(run.train_rows[i].input_ids) for batch in chosen for i in batch)
    widest = sum(4 * max(len(run.train_rows[i].input_ids) for i in batch) for batch in chosen)
    assert metrics[0]["tokens"] == metrics[1]["tokens"] == real < widest  # real tokens, not padded ones
    for m in metrics:
        seconds = m["train_seconds"]  # rounded to 0.01 s in the file
        assert m["tokens"] / (seconds + 0.006) <= m["tokens_per_second"] <= m["tokens"] / max(seconds - 0.006, 1e-3)
