"""One save of one adapter folder as a transaction: a reader finds the whole old adapter or the whole new one.

A folder holds fixed names (``adapter_config.json``, ``adapter_model.safetensors`` or ``.bin``, ``README.md``) that
PEFT reads directly, and POSIX cannot rename several names at once. So a save journals:

1. under an exclusive lock on the folder (``flock`` on the folder itself, no lock file), finish or remove what an
   interrupted save left (see 5);
2. write every new file into a fresh hidden staging folder ``.lorakit-save-*.tmp`` inside the adapter folder, fsync
   each file and the staging folder;
3. **commit**: rename the staging folder to ``.lorakit-commit-<ns>-*`` (one atomic rename) and fsync the folder.
   Before this instant the old adapter is the adapter; after it, the new one;
4. roll forward: delete every old weights file (both formats, so a format switch leaves no stale file), fsync, then
   move the new config, weights and card into place, fsync, remove the journal folder.
   Old weights go before the new config arrives, so a reader that knows nothing of the journal (PEFT) sees the old
   pair, a config with no weights file (a clear "file not found"), or the new pair: never a mixed pair;
5. a committed journal left by a killed save is rolled forward by the next save or lorakit load of the folder;
   an uncommitted staging folder, or a ``.<name>.*.tmp`` of the older per-file writes, is deleted by the next save.

Readers take a shared lock on the folder while they read, so a live save (same machine) is never seen half-way.
Where ``fcntl`` is missing (Windows) or the filesystem refuses locks, saves are not serialised: two concurrent
savers may then mix files, which the loader refuses (``io.binding``) rather than loading.

``FAULT_HOOK`` (tests only) is called with the name of each step before it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..config import CONFIG_NAME
from .atomic import final_mode

STAGING_PREFIX = ".lorakit-save-"
COMMIT_PREFIX = ".lorakit-commit-"
FAULT_HOOK: Callable[[str], None] | None = None

Writer = Callable[[Path], None]


def _step(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames); a folder that cannot be opened or flushed (Windows,
    some network filesystems) is skipped: its renames happened, only their durability across a power cut is lost."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold an flock on ``folder`` itself (exclusive for a save, shared for a read); released when the descriptor
    closes, also when the process is killed. A no-op where locks are unavailable."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. ENOLCK on a filesystem without locks: carry on unserialised
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _journals(folder: Path) -> list[Path]:
    """Committed journals in commit order (their names start with the commit time in ns)."""
    return sorted(p for p in folder.iterdir() if p.name.startswith(COMMIT_PREFIX) and p.is_dir())


def _roll_forward(folder: Path, journal: Path, weights_names: tuple[str, ...]) -> None:
    """Move a committed journal's files into ``folder``; idempotent, so a kill half-way is finished by a rerun."""
    new_weights = [n for n in weights_names if (journal / n).exists()]
    if new_weights:  # the new weights are still in the journal: no old weights file may survive their arrival
        for name in weights_names:
            if (folder / name).exists():
                _step(f"unlink:{name}")
                (folder / name).unlink()
        _step("fsync:folder")
        _fsync_path(folder)
    # the config first, then the weights, then the rest (the card): new weights never sit beside an old config
    staged = sorted((p.name for p in journal.iterdir()), key=lambda n: (n != CONFIG_NAME, n not in weights_names, n))
    for name in staged:
        _step(f"rename:{name}")
        os.replace(journal / name, folder / name)
    _step("fsync:folder")
    _fsync_path(folder)
    _step("rmdir:journal")
    journal.rmdir()
    _fsync_path(folder)


def finish_interrupted(folder: Path, weights_names: tuple[str, ...]) -> None:
    """Roll forward any save that committed in ``folder`` but was killed before it finished. Call under the lock."""
    for journal in _journals(folder):
        _roll_forward(folder, journal, weights_names)


def _is_leftover(name: str, file_names: tuple[str, ...]) -> bool:
    if name.startswith(STAGING_PREFIX) and name.endswith(".tmp"):
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in file_names)


def remove_leftovers(folder: Path, file_names: tuple[str, ...]) -> None:
    """Delete uncommitted staging folders and the per-file ``.<name>.*.tmp`` of older saves. Call under the lock."""
    for path in sorted(folder.iterdir()):
        if _is_leftover(path.name, file_names):
            _step(f"cleanup:{path.name}")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def settle(folder: Path, weights_names: tuple[str, ...]) -> None:
    """Before reading ``folder``: finish a save that committed but was killed. Cheap when there is none."""
    if not folder.is_dir() or not any(p.name.startswith(COMMIT_PREFIX) for p in folder.iterdir()):
        return
    try:
        with folder_lock(folder, exclusive=True):
            finish_interrupted(folder, weights_names)
    except OSError as err:
        raise OSError(
            f"{folder} holds a save that was interrupted after it committed ({COMMIT_PREFIX}* folder); it could not "
            f"be completed here ({type(err).__name__}: {err}). Open the folder once from a process that may write "
            "to it, or save the adapter again."
        ) from None


def _stage(folder: Path, writers: Mapping[str, Writer]) -> Path:
    _step("mkdir:staging")
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=folder))
    try:
        for name, writer in writers.items():
            _step(f"write:{name}")
            writer(staging / name)
            os.chmod(staging / name, final_mode(folder / name))
            _step(f"fsync:{name}")
            _fsync_path(staging / name)
        _step("fsync:staging")
        _fsync_path(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an exception (not a kill): leave nothing behind
        raise
    return staging


def write_transaction(folder: Path, writers: Mapping[str, Writer], weights_names: tuple[str, ...]) -> None:
    """Replace ``folder``'s adapter by the files ``writers`` produce ({file name: writer(path)}), as one transaction.

    Every name in ``weights_names`` not among the new files is deleted in the same transaction. Files of the folder
    that are neither written nor weights (a README kept as it is, other adapters' subfolders, the user's files) are
    not touched."""
    folder.mkdir(parents=True, exist_ok=True)
    file_names = (*weights_names, *writers, CONFIG_NAME, "README.md")  # whose .<name>.*.tmp older saves left
    with folder_lock(folder, exclusive=True):
        finish_interrupted(folder, weights_names)
        remove_leftovers(folder, file_names)
        staging = _stage(folder, writers)
        token = staging.name.removeprefix(STAGING_PREFIX).removesuffix(".tmp")
        journal = folder / f"{COMMIT_PREFIX}{time.time_ns():020d}-{token}"
        _step("commit")
        os.replace(staging, journal)
        _step("fsync:folder")
        _fsync_path(folder)
        _roll_forward(folder, journal, weights_names)


@contextlib.contextmanager
def reading(folder: Path | None, weights_names: tuple[str, ...]) -> Iterator[None]:
    """Hold a shared lock on ``folder`` while its files are read, after finishing a save that was killed after it
    committed (a save killed while this reader waited is finished too). ``None`` (a Hub id): nothing to do."""
    if folder is None or not folder.is_dir():
        yield
        return
    while True:
        settle(folder, weights_names)
        with folder_lock(folder, exclusive=False):
            if not _journals(folder):
                yield
                return
