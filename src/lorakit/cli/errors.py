"""User-facing errors of the command line: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_ERROR = 2
INTERRUPTED = 130


class CliError(Exception):
    """Bad input from the user (a missing file, a malformed line, an unknown module name, ...).

    ``main`` prints the message as one line and exits with code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong and where to look) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(USAGE_ERROR)


def one_line(err: BaseException) -> str:
    """The message of an exception on one line (library errors sometimes span several)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__
