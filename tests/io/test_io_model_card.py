"""README.md beside a saved adapter: the same card (metadata and text) as peft writes, new or updated."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import lorakit
from models import MLP, tiny_gpt2, tiny_llama

EXISTING = "---\nlicense: mit\n---\n\n# My adapter\n\nHello.\n"


def _save_both(tmp_path, build, existing: str | None = None, **kwargs):
    cards = []
    for lib in (peft, lorakit):
        folder = tmp_path / lib.__name__
        folder.mkdir()
        if existing is not None:
            (folder / "README.md").write_text(existing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.get_peft_model(build(), lib.LoraConfig(**kwargs)).save_pretrained(folder)
        cards.append((folder / "README.md").read_text())
    return cards


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (MLP, dict(target_modules=["lin0"])),  # a plain torch model: no base_model, no transformers tag
        (tiny_llama, dict(target_modules=["q_proj"], task_type="CAUSAL_LM")),  # pipeline_tag text-generation
        (tiny_gpt2, dict(target_modules=["c_attn"])),
    ],
)
def test_new_card_equals_peft(tmp_path, build, kwargs):
    theirs, ours = _save_both(tmp_path, build, **kwargs)
    assert ours == theirs
    assert "base_model: unknown" not in ours and "library_name: peft" in ours


def test_existing_card_is_updated_like_peft(tmp_path):
    theirs, ours = _save_both(tmp_path, tiny_llama, EXISTING, target_modules=["q_proj"], task_type="CAUSAL_LM")
    assert ours == theirs
    assert "license: mit" in ours and "# My adapter" in ours and "library_name: peft" in ours


def test_a_second_save_does_not_repeat_the_version_line(tmp_path):
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    first = (tmp_path / "README.md").read_text()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == first
    assert first.count("- PEFT ") == 1


def test_model_tags_of_the_base_are_kept(tmp_path):
    base = tiny_llama()
    base.model_tags = ["my-tag"]
    torch.manual_seed(0)
    lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert "- my-tag" in (tmp_path / "README.md").read_text()
