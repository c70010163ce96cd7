"""The allowed range of every numeric command-line value, in one place.

A ``Range`` is an argparse ``type=``: it parses the text (an integer or a finite real number), checks the bounds
and raises ``argparse.ArgumentTypeError`` otherwise, so a bad value ends as one line on stderr and exit code 2
before anything is loaded: ``lorakit train: error: argument --lr: expected a finite number > 0, got 'nan'``.
The named ranges below are what the subcommands use; ``LORA_FIELDS`` / ``LORA_MAPPING_VALUES`` cover the numeric
``LoraConfig`` fields that are flags (``lora_options`` applies them after reading a value).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Numbers in [low, high] (an end is open when ``low_open`` / ``high_open``; None = unbounded), always finite;
    integers only when ``integer``; ``also`` lists extra allowed values with their meaning (``{-1: "all"}``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple[tuple[int, str], ...] = ()

    def describe(self) -> str:
        """E.g. 'an integer >= 1', 'a finite number in [0, 1)', 'an integer >= 1 or -1 (all)'."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        return text + "".join(f" or {value} ({meaning})" for value, meaning in self.also)

    def contains(self, value: float) -> bool:
        if any(value == special for special, _ in self.also):
            return True
        if isinstance(value, bool) or not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, value: Any, shown: str | None = None) -> Any:
        """``value`` when it is in range, else ArgumentTypeError naming the range and ``shown`` (default repr)."""
        if not isinstance(value, (int, float)) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {shown or repr(value)}")
        return value

    def __call__(self, text: str) -> int | float:
        """argparse ``type=``: parse ``text`` and check it."""
        try:
            value: int | float = int(text.strip()) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        return self.check(value, repr(text))


COUNT = Range(1, integer=True)
"""Steps, batch sizes, tokens, threads, ranks: at least 1."""
COUNT_OR_OFF = Range(0, integer=True)
"""Every-N-steps options and counts where 0 switches the feature off."""
COUNT_OR_ALL = Range(0, integer=True, also=((-1, "all"),))
DEMO_EVAL_LIMIT = Range(1, integer=True, also=((-1, "all"),))
SEED = Range(0, 2**63 - 1, integer=True)
"""What torch.manual_seed and random.Random both take."""
MAX_LENGTH = Range(2, integer=True)
"""Tokens per example: at least a token and the one it predicts."""
LEARNING_RATE = Range(0, low_open=True)
EPOCHS = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
"""Weight decay, gradient-clipping norm (0 = off), sampling temperature (0 = greedy)."""
HELD_OUT_FRACTION = Range(0, 1, high_open=True)
"""Share of the data held out: 0 = none, never all of it."""
RATIO = Range(0, 1)
TOP_P = Range(0, 1, low_open=True)
FINITE = Range()
DROPOUT = Range(0, 1, high_open=True)

LORA_FIELDS: dict[str, Range] = {"r": COUNT, "lora_alpha": FINITE, "lora_dropout": DROPOUT}
"""Numeric LoraConfig fields that are flags -> their range (checked on the command line, before LoraConfig)."""
LORA_MAPPING_VALUES: dict[str, Range] = {"rank_pattern": COUNT, "alpha_pattern": FINITE}
"""LoraConfig mappings of numbers (``--rank-pattern q_proj=4``) -> the range of each value."""
