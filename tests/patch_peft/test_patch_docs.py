"""Runs every ```python block of docs/patch-peft.md in order (the TRL recipe on the bundled demo model)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "patch-peft.md"
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```", re.M | re.S)


def test_patch_peft_doc_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = DOC.read_text()
    blocks = [(text.count("\n", 0, m.start("code")) + 1, m.group("code")) for m in BLOCK.finditer(text)]
    assert len(blocks) == 2
    line, first = blocks[0]
    assert "lorakit.patch_peft(model)" in first  # the one-line usage: shown, run below on a real peft model
    namespace: dict = {"__name__": "patch_peft_doc"}
    for line, code in blocks[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    trainer = namespace["trainer"]
    assert any(type(m).__qualname__ == "PatchedLinear" for m in trainer.model.modules())
    assert (tmp_path / "sft-adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "sft-adapter" / "model.safetensors").exists()
