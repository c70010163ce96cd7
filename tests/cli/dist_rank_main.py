"""One torchrun rank of ``lorakit ARGV``, run from its own folder ``rank{RANK}/`` (made here), so that a relative
``--out`` is a different folder on each rank, as on machines that share no disk: a file rank 1 wrote would show.

``LORAKIT_TEST_RANK1_ARGS`` (shell words) are appended to rank 1's arguments only: a mismatched launch.
Used by test_cli_distributed.py: ``python -m torch.distributed.run --standalone --nproc-per-node 2 THIS ARGV``.
"""

import os
import shlex
import sys
from pathlib import Path

from lorakit.cli.main import main

rank = os.environ["RANK"]
folder = Path(f"rank{rank}")
folder.mkdir(exist_ok=True)
os.chdir(folder)
extra = shlex.split(os.environ.get("LORAKIT_TEST_RANK1_ARGS", "")) if rank == "1" else []
sys.exit(main([*sys.argv[1:], *extra]))
