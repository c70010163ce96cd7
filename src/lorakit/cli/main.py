"""Entry point of the ``lorakit`` command (``lorakit = lorakit.cli.main:main``, also ``python -m lorakit``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from .errors import INTERRUPTED, USAGE_ERROR, CliError, OneLineArgumentParser, one_line

SUBCOMMANDS: dict[str, str] = {
    "train": "lorakit.cli.train",
    "generate": "lorakit.cli.generate",
    "merge": "lorakit.cli.merge",
    "inspect": "lorakit.cli.inspect_adapter",
    "demo": "lorakit.cli.demo",
}
"""Subcommand -> module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Add a command here."""


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="lorakit", description="LoRA fine-tuning, generation, merging and inspection (PEFT-compatible adapters)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineArgumentParser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(f"lorakit: warning: {one_line(message)}\n")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Library warnings as single lines; no progress bars or info logs from transformers / huggingface_hub."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = _one_line_warning
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 2 bad input, 130 interrupted with a checkpoint saved)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc N` launches itself again
    with _quiet_libraries():
        try:
            return int(args.run(args) or 0)
        except CliError as err:
            if args.debug:
                raise
            sys.stderr.write(f"lorakit {args.command}: error: {one_line(err)}\n")
            return getattr(err, "exit_code", USAGE_ERROR)
        except KeyboardInterrupt:
            sys.stderr.write(f"lorakit {args.command}: interrupted\n")
            return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
