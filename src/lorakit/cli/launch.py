"""``lorakit train --nproc N``: the same command started again on N processes of this machine by torch's own
launcher, exactly as ``torchrun --standalone --nproc-per-node N -m lorakit train ...`` would (``--nproc`` stays
in the command; each rank checks that it matches the launch).

Each rank prints its own outcome (rank 0 the progress and the result, any rank its one-line error); the launcher
adds nothing but the exit code: the first failed rank's, or 128 + the signal that stopped the run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from .ranks import launched


def wants_relaunch(args: argparse.Namespace) -> bool:
    return getattr(args, "nproc", None) is not None and not launched()


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torch.distributed.run's arguments for this command (``python -m torch.distributed.run ARGV``)."""
    return ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "lorakit", *args.argv]


def _torchrun_options(args: argparse.Namespace) -> argparse.Namespace:
    """torchrun's parsed options; the command's own arguments are set afterwards, so that torchrun's parser never
    reads them (it would take ``--nproc`` for an abbreviation of its ``--nproc-per-node``)."""
    from torch.distributed.run import parse_args

    argv = torchrun_argv(args)
    options = parse_args(argv[: argv.index("lorakit") + 1])
    options.training_script_args = list(args.argv)
    return options


@contextlib.contextmanager
def _quiet_launcher(debug: bool) -> Iterator[None]:
    """The ranks say what happened; torchrun's and its elastic agent's log lines are kept for --debug. (Their loggers
    carry their own levels, so each one is set.)"""
    names = [
        n
        for n in logging.root.manager.loggerDict
        if n.startswith(("torch.distributed.elastic", "torch.distributed.run"))
    ]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    if not debug:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def relaunch(args: argparse.Namespace) -> int:
    """Run this command on ``args.nproc`` local processes through torch.distributed.run; their exit code."""
    from torch.distributed.elastic.agent.server import local_elastic_agent  # noqa: F401  (its loggers, for _quiet)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run as torchrun

    with _quiet_launcher(bool(getattr(args, "debug", False))):
        try:
            torchrun(_torchrun_options(args))
        except ChildFailedError as err:
            _, failure = err.get_first_failure()
            return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        except SignalException as err:
            return 128 + int(err.sigval)
    return 0
