"""The progress display labels its losses: the step's loss and the moving average ``loss(avg)`` (issue 14,
item 14: an unlabelled average read 5.03 while the step's loss was 2.58)."""

from __future__ import annotations

import io
import json
import re

import pytest
from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl

from lorakit.cli import progress


def test_line_display_prints_step_loss_and_labelled_average():
    stream = io.StringIO()
    with progress.LineProgress(10, 0, stream) as display:
        display.update(10, 2.58, 5.03, 1234.0)
    line = stream.getvalue()
    assert "loss 2.5800" in line and "loss(avg) 5.0300" in line, line


def test_tqdm_display_labels_both_losses():
    stream = io.StringIO()
    with progress.TqdmProgress(10, 0, stream) as display:
        display.update(3, 2.58, 5.03, 1234.0)
        postfix = display.bar.postfix
    assert "loss=2.5800" in postfix and "loss(avg)=5.0300" in postfix, postfix


def test_rich_display_labels_both_losses():
    pytest.importorskip("rich")
    stream = io.StringIO()
    display = progress.RichProgress(10, 0, stream)
    display.update(3, 2.58, 5.03, 1234.0)
    display.bar.console.print(display.bar)  # render once, without starting the live display
    text = stream.getvalue()
    assert "loss 2.5800" in text and "loss(avg) 5.0300" in text, text


def test_train_prints_the_step_loss_the_metrics_record(tmp_path, capsys):
    """End to end: each progress line's step loss is the loss train_metrics.json records for that step, and its
    average is the exponential moving average (0.9 / 0.1) of the step losses up to it."""
    model = tiny_lm_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(24))
    argv = train_argv(model, data, tmp_path / "out", "--max-steps", "10")
    argv[argv.index("--progress") + 1] = "lines"
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    losses = dict(json.loads((tmp_path / "out" / "train_metrics.json").read_text())["losses"])
    printed = re.findall(r"step\s+(\d+)/10\s+loss ([0-9.]+)\s+loss\(avg\) ([0-9.]+)", err)
    assert [int(s) for s, _, _ in printed] == list(range(1, 11))
    average = None
    for step, loss, avg in printed:
        value = losses[int(step)]
        average = value if average is None else 0.9 * average + 0.1 * value
        assert float(loss) == pytest.approx(value, abs=1e-4)
        assert float(avg) == pytest.approx(average, abs=1e-4)
