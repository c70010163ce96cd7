"""Runs every ```python block of docs/guide.md, in order, in one shared namespace, so the guide cannot drift from
the code. A block preceded by an ``<!-- skip: reason -->`` comment is not run (multi-process or CUDA-only code); one
preceded by ``<!-- needs: module -->`` runs only when that optional module (bitsandbytes) is importable."""

from __future__ import annotations

import importlib.util
import re
import tempfile
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = DOCS / "guide.md"
BLOCK = re.compile(
    r"(?:<!--\s*(?P<kind>skip|needs):(?P<reason>[^>]*?)-->\s*\n)?^```python\n(?P<code>.*?)^```", re.M | re.S
)


def _skip_reason(kind: str | None, reason: str | None) -> str | None:
    """Why a block is not run here, or None to run it."""
    if kind == "skip":
        return reason.strip()
    if kind == "needs" and importlib.util.find_spec(reason.strip()) is None:
        return f"{reason.strip()} is not installed"
    return None


def guide_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```python block, in order."""
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("code"), _skip_reason(m.group("kind"), m.group("reason")))
        for m in BLOCK.finditer(text)
    ]


def test_block_extraction_sees_skips_and_code():
    text = (
        "x\n```python\na = 1\n```\n<!-- skip: gpu -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
        "<!-- needs: no_such_module_xyz -->\n```python\nc = 3\n```\n<!-- needs: torch -->\n```python\nd = 4\n```\n"
    )
    assert guide_blocks(text) == [
        (3, "a = 1\n", None),
        (7, "b = 2\n", "gpu"),
        (14, "c = 3\n", "no_such_module_xyz is not installed"),
        (18, "d = 4\n", None),
    ]


def test_guide_snippets_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the guide's mkdtemp() lands in pytest's tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = guide_blocks(GUIDE.read_text())
    assert len(blocks) >= 20, f"expected the guide's snippets, found {len(blocks)}"
    skipped = [reason for _, _, reason in blocks if reason and "not installed" not in reason]
    assert len(skipped) <= 2, f"keep skips few: {skipped}"
    run_blocks(blocks, "docs/guide.md")


def run_blocks(blocks: list[tuple[int, str, str | None]], filename: str) -> dict:
    """Run the blocks that are not skipped, in order, in one namespace (returned)."""
    namespace: dict = {"__name__": "doc"}
    for line, code, reason in blocks:
        if reason:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # padded with newlines so that tracebacks give the document's own line numbers
            exec(compile("\n" * (line - 1) + code, filename, "exec"), namespace)
    return namespace


def test_trainer_integration_snippets_run_in_order(tmp_path, monkeypatch):
    """docs/transformers-integration.md: LorakitTrainer and the TRL section, on the bundled demo model."""
    import pytest

    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    blocks = guide_blocks((DOCS / "transformers-integration.md").read_text())
    assert len(blocks) >= 3
    run_blocks(blocks, "docs/transformers-integration.md")
    assert (tmp_path / "sft-adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "sft-adapter" / "model.safetensors").exists()
