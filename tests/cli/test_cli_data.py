"""Training data: loss masks (completion / assistant turns only), chunking, splits and batch order."""

from __future__ import annotations

import pytest
from cli_helpers import char_tokenizer, write_jsonl

from lorakit.cli.data import (
    IGNORE_INDEX,
    Example,
    batch_at,
    encode,
    encode_all,
    read_examples,
    split_examples,
)
from lorakit.cli.errors import CliError


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _trained_text(tok, encoded) -> str:
    return tok.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_prompt_completion_trains_on_the_completion_and_eos_only(tok):
    encoded = encode(Example([("Q: 2+2?", False), (" 4", True)], "Q: 2+2?", " 4"), tok, 64)
    assert encoded.input_ids[0] == tok.bos_token_id and encoded.input_ids[-1] == tok.eos_token_id
    assert tok.decode(encoded.input_ids, skip_special_tokens=True) == "Q: 2+2? 4"
    assert _trained_text(tok, encoded) == " 4</s>"
    assert encoded.labels[: 1 + len("Q: 2+2?")] == [IGNORE_INDEX] * 8


def test_chat_trains_on_assistant_turns_only(tok, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    ]
    (example,) = read_examples(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    encoded = encode(example, tok, 256)
    full = tok.decode(encoded.input_ids, skip_special_tokens=True)
    assert full.startswith("<|system|>be brief\n<|user|>hi\n<|assistant|>yo\n<|user|>again\n<|assistant|>ok\n")
    assert _trained_text(tok, encoded) == "yo\nok\n</s>"
    assert (example.prompt.endswith("<|user|>again\n<|assistant|>"), example.completion) == (True, "ok\n")


def test_plain_text_is_chunked_with_loss_everywhere(tok, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("first paragraph\n\n\nsecond one that is a lot longer than sixteen characters\n")
    rows = encode_all(read_examples(str(path)), tok, 16, "training")
    # <s> + 15 chars + </s> = 17 -> 16 (a 1-token tail is dropped); <s> + 55 chars + </s> = 57 -> 16, 16, 16, 9
    assert [len(r.input_ids) for r in rows] == [16, 16, 16, 16, 9]
    assert all(r.labels == r.input_ids for r in rows)
    assert tok.decode(rows[0].input_ids, skip_special_tokens=True) == "first paragraph"


def test_split_is_seeded_and_disjoint():
    examples = [Example([(str(i), True)]) for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and not {id(e) for e in train} & {id(e) for e in held}
    assert [e.segments for e in held] == [e.segments for e in split_examples(examples, 0.25, seed=3)[1]]
    assert split_examples(examples, 0.0, seed=3) == (examples, [])


def test_batches_depend_only_on_step_seed_and_epoch(tok):
    rows = encode_all([Example([(f"w{i}", False), (f" {i}", True)], f"w{i}", f" {i}") for i in range(10)], tok, 32, "t")
    first = [batch_at(rows, s, 4, 7, tok.pad_token_id)["input_ids"].tolist() for s in range(6)]
    again = [batch_at(rows, s, 4, 7, tok.pad_token_id)["input_ids"].tolist() for s in range(6)]
    assert first == again
    epoch0 = sorted(map(str, first[0] + first[1]))  # 2 full batches per epoch (10 // 4), the remainder is dropped
    assert len(set(epoch0)) == 8
    assert first[0] != first[2], "each epoch reshuffles"


def test_fixed_width_batches_pad_to_it_and_keep_the_rows(tok):
    rows = encode_all([Example([(f"w{i}", False), (f" {i}", True)], f"w{i}", f" {i}") for i in range(10)], tok, 32, "t")
    loose = batch_at(rows, 1, 4, 7, tok.pad_token_id)
    fixed = batch_at(rows, 1, 4, 7, tok.pad_token_id, width=20)
    n = loose["input_ids"].shape[1]
    assert n < 20 and all(v.shape == (4, 20) for v in fixed.values())
    for key in ("input_ids", "attention_mask", "labels"):
        assert fixed[key][:, :n].tolist() == loose[key].tolist()
    assert fixed["attention_mask"][:, n:].sum() == 0 and (fixed["labels"][:, n:] == IGNORE_INDEX).all()
    assert (fixed["input_ids"][:, n:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match=f"width 3 is shorter than the longest row \\({n} tokens\\)"):
        batch_at(rows, 1, 4, 7, tok.pad_token_id, width=3)


def test_empty_and_non_object_lines(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(CliError, match="holds no examples"):
        read_examples(str(empty))
    with pytest.raises(CliError, match=r"list.jsonl:1: expected a JSON object, got list"):
        read_examples(str(write_jsonl(tmp_path / "list.jsonl", [[1, 2]])))
    with pytest.raises(CliError, match=r":1: 'completion' is empty"):
        read_examples(str(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": ""}])))
