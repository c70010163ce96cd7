"""Every numeric flag has a range: a value outside it (or NaN, inf, text) ends with one line on stderr and exit 2
before anything is loaded or written (issue 14, items 10 and 11)."""

from __future__ import annotations

import argparse

import pytest
from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl

from lorakit.cli import ranges
from lorakit.cli.main import build_parser


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    return {
        "model": tiny_lm_dir(root / "model"),
        "data": write_jsonl(root / "train.jsonl", task_rows(12)),
        "root": root,
    }


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


TRAIN_BAD = [
    ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "inf"), ("--threads", "-1"), ("--threads", "0"),
    ("--max-steps", "-1"), ("--max-steps", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--eval-fraction", "1.5"),
    ("--eval-fraction", "1"), ("--eval-fraction", "-0.1"), ("--warmup-ratio", "5"), ("--max-length", "0"),
    ("--max-grad-norm", "nan"), ("--max-grad-norm", "-1"), ("--weight-decay", "-0.1"), ("--batch-size", "0"),
    ("--grad-accum", "0"), ("--save-every", "-2"), ("--eval-every", "-1"), ("--eval-generate", "-2"),
    ("--show-examples", "-1"), ("--seed", "-1"), ("--seed", "1.5"), ("--alpha", "nan"), ("--alpha", "inf"),
    ("--r", "-3"), ("--dropout", "1.5"), ("--dropout", "nan"), ("--rank-pattern", "q_proj=0"),
    ("--alpha-pattern", "q_proj=nan"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), TRAIN_BAD)
def test_train_refuses_out_of_range_values_before_loading(files, capsys, flag, value):
    out = files["root"] / f"out{flag}{value}"
    argv = [*train_argv(files["model"], files["data"], out), flag, value]
    line = _one_line(*run_cli(argv, capsys)[::2], flag, "expected", value)
    assert "Traceback" not in line
    assert not out.exists(), "nothing may be written for a bad flag"


GENERATE_BAD = [
    ("--max-new-tokens", "-1"), ("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
    ("--top-p", "5"), ("--top-p", "0"), ("--seed", "-5"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), GENERATE_BAD)
def test_generate_refuses_out_of_range_values(files, capsys, flag, value):
    argv = ["generate", "--model", files["model"], "--prompt", "Copy a:", flag, value]
    _one_line(*run_cli(argv, capsys)[::2], flag, "expected", value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--steps", "0"),
        ("--batch-size", "-1"),
        ("--lr", "nan"),
        ("--r", "0"),
        ("--eval-limit", "0"),
        ("--threads", "-1"),
    ],
)
def test_demo_refuses_out_of_range_values(files, capsys, flag, value):
    out = files["root"] / "demo"
    _one_line(*run_cli(["demo", "--out", out, flag, value], capsys)[::2], flag, "expected")
    assert not out.exists()


def test_demo_refuses_an_unknown_progress_display(capsys):
    _one_line(*run_cli(["demo", "--progress", "fancy"], capsys)[::2], "--progress", "'fancy'", "lines")


def test_in_range_values_still_parse():
    args = build_parser().parse_args(
        ["train", "--model", "m", "--data", "d", "--out", "o", "--lr", "1e-3", "--eval-fraction", "0",
         "--warmup-ratio", "1", "--max-grad-norm", "0", "--eval-generate", "-1", "--alpha", "-8", "--dropout", "0",
         "--rank-pattern", "q_proj=4", "--alpha-pattern", '{"v_proj": 2.5}']
    )  # fmt: skip
    assert (args.lr, args.eval_fraction, args.warmup_ratio, args.max_grad_norm) == (1e-3, 0.0, 1.0, 0.0)
    assert (args.eval_generate, args.lora_lora_alpha, args.lora_lora_dropout) == (-1, -8, 0.0)
    assert args.lora_rank_pattern == {"q_proj": 4} and args.lora_alpha_pattern == {"v_proj": 2.5}


def _numeric_actions(parser: argparse.ArgumentParser, prefix: str = "lorakit"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_actions(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_no_numeric_flag_is_read_without_a_range():
    """A flag read with plain ``int`` / ``float`` would accept -1, NaN or inf: every one goes through a Range."""
    unchecked = [
        f"{command} {action.option_strings[0]}"
        for command, action in _numeric_actions(build_parser())
        if action.type in (int, float)
    ]
    assert unchecked == []
    ranged = [a for _, a in _numeric_actions(build_parser()) if isinstance(a.type, ranges.Range)]
    assert len(ranged) >= 20


def test_range_texts():
    assert ranges.COUNT.describe() == "an integer >= 1"
    assert ranges.HELD_OUT_FRACTION.describe() == "a finite number in [0, 1)"
    assert ranges.TOP_P.describe() == "a finite number in (0, 1]"
    assert ranges.COUNT_OR_ALL.describe() == "an integer >= 0 or -1 (all)"
    assert ranges.COUNT("7") == 7 and ranges.COUNT_OR_ALL("-1") == -1 and ranges.RATIO("0.25") == 0.25
    for bad in ("1.5", "x", "", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            ranges.COUNT(bad)
