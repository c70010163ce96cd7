"""``--out`` folders of ``lorakit train`` and ``lorakit merge``.

- A folder holding files the command did not write is refused unless ``--overwrite`` (``foreign_entries``).
- Writability is probed before any work (``ensure_writable``), not discovered at the final save.
- ``merge`` writes into a staging folder inside ``--out`` and moves the files in (``staging`` + ``publish``): it
  replaces files of the same names, deletes nothing, and gives the files ordinary permissions (0666 minus the
  umask; some writers leave 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from .errors import CliError

STAGING_PREFIX = ".lorakit-staging-"
PROBE_PREFIX = ".lorakit-probe-"


def _ours(name: str) -> bool:
    return name.startswith((STAGING_PREFIX, PROBE_PREFIX))


def foreign_entries(out: Path, ours: Collection[str] = ()) -> list[str]:
    """Names in ``out`` (sorted) other than ``ours`` and the leftovers of this module's staging and probes."""
    if not out.is_dir():
        return []
    return sorted(
        p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in ours and not _ours(p.name)
    )


def listing(names: Sequence[str], limit: int = 8) -> str:
    """'a, b, c' or 'a, b, ... and 5 more'."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def ensure_writable(out: Path, flag: str = "--out") -> None:
    """Create ``out`` (with its parents) and write and remove a probe file in it; one clear error if that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CliError(f"{flag} {str(out)!r} is not writable ({reason}); choose another folder.") from None


def ordinary_mode() -> int:
    """Permission bits of an ordinary new file: 0666 minus the process umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out`` (same file system, so ``publish`` renames); removed on exit."""
    for leftover in out.glob(STAGING_PREFIX + "*"):  # from a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staged: Path, out: Path, last: Sequence[str] = ()) -> list[str]:
    """Move every file of ``staged`` into ``out`` (replacing files of the same names) with ordinary permissions;
    the names in ``last`` move last (e.g. config.json, so a reader never finds it before the weights).
    Returns the names moved."""
    entries = sorted(staged.iterdir(), key=lambda p: (p.name in last, p.name))
    taken = [p.name for p in entries if p.is_dir() and (out / p.name).exists()]
    if taken:
        raise CliError(f"{str(out)!r} already holds {listing(taken)}, which this command writes as folders.")
    mode = ordinary_mode()
    for path in entries:
        for file in [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]:
            file.chmod(mode)
        os.replace(path, out / path.name)
    return [p.name for p in entries]
