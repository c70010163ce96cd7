"""Resolve a local folder or a Hugging Face Hub id to a local file, through huggingface_hub (cache, offline mode)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def resolve_file(
    path_or_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    required: bool = True,
    **hub_kwargs: Any,
) -> Path | None:
    """Return the local path of ``filename`` in a folder or a Hub repo, or None if absent and not ``required``.

    A local directory is used as is. Anything else is treated as a Hub repo id and fetched through
    ``huggingface_hub.hf_hub_download``, which honours ``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE``.
    """
    local = Path(path_or_id)
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if candidate.exists():
            raise IsADirectoryError(f"{candidate} is a directory (or another non-file); {filename} must be a file.")
        if required:
            present = sorted(p.name for p in local.iterdir())
            raise FileNotFoundError(f"No {filename} in {str(local)!r}; the folder holds: {present or 'nothing'}.")
        return None
    if Path(path_or_id).exists() and not Path(path_or_id).is_dir():
        raise FileNotFoundError(f"{str(path_or_id)!r} is a file; expected an adapter folder or a Hub repo id.")
    return _hub_download(str(path_or_id), filename, subfolder, revision, required, hub_kwargs)


def _hub_download(
    repo_id: str, filename: str, subfolder: str | None, revision: str | None, required: bool, hub_kwargs: dict
) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    allowed = {"cache_dir", "local_files_only", "token", "force_download", "proxies", "repo_type"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    where = f"Hub repo {repo_id!r} (revision={revision or 'main'!r}, subfolder={subfolder!r})"
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=revision, **kwargs))
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hub repo id ({err})."
        ) from None
    except LocalEntryNotFoundError as err:
        # offline or unreachable: the file is only really absent if the snapshot itself is cached
        if not _repo_cached(repo_id, revision, kwargs):
            raise FileNotFoundError(
                f"Could not resolve {filename} for {where}: it is not a local folder, and the Hub cache holds no "
                f"snapshot of it while the Hub is unreachable or offline mode is on ({err})."
            ) from None
        if required:
            raise FileNotFoundError(f"{filename} not found in the cached snapshot of {where}.") from None
        return None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in {where}.") from None
        return None
    except OSError as err:  # repository or revision not found, network errors
        raise FileNotFoundError(f"Could not resolve {filename} for {where}: {type(err).__name__}: {err}") from None


def _repo_cached(repo_id: str, revision: str | None, kwargs: dict) -> bool:
    """True when the snapshot of ``repo_id`` at ``revision`` is in the cache, so a missing optional file is really
    missing (rather than not downloaded). Reads the documented cache layout: refs/<revision> -> snapshots/<commit>."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(kwargs.get("cache_dir") or constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=kwargs.get("repo_type") or "model")
    revision = revision or "main"
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return (storage / "snapshots" / commit).is_dir()
