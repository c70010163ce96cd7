"""Is a ``--model`` / ``--adapter`` / ``inspect`` argument a local folder or a Hugging Face Hub id? Decided at once.

A name that is not an existing folder goes to the Hub only when that can work; otherwise it fails before anything
is loaded with "no such folder; did you mean ...?" (close names among the folder's siblings), instead of half a
minute of download retries:

- it looks like a local path: starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first folder
  exists here (``runs/adaptr`` when ``runs/`` exists); for adapters also a bare name (``my_adapter``): Hub adapters
  always live under a user or organisation (``org/name``);
- it is not a valid Hub id;
- it is not in the Hugging Face cache and the Hub is offline (``HF_HUB_OFFLINE``) or does not answer one quick
  request (``hub_problem``).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from pathlib import Path

from .errors import CliError, one_line

PROBE_TIMEOUT_S = 3.0


def looks_local(text: str, bare_is_local: bool) -> bool:
    """True when ``text`` can only mean a local path (see the module docstring)."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    if "/" not in text:
        return bare_is_local
    return Path(text.split("/", 1)[0]).is_dir()


def close_paths(text: str, siblings: list[str], index: int = -1) -> list[str]:
    """``text`` with its ``/``-separated component ``index`` replaced by each close match among ``siblings``."""
    parts = text.split("/")
    index %= len(parts)
    matches = difflib.get_close_matches(parts[index], siblings, n=3, cutoff=0.6)
    return ["/".join([*parts[:index], match, *parts[index + 1 :]]) for match in matches]


def suggestions(text: str) -> list[str]:
    """Close existing names for the first component of ``text`` that does not exist (checked on disk)."""
    parts = text.split("/")
    for i in range(len(parts)):
        prefix = "/".join(parts[: i + 1])
        if not prefix or Path(prefix).expanduser().exists():
            continue
        parent = Path("/".join(parts[:i]) or ("/" if text.startswith("/") else ".")).expanduser()
        try:
            siblings = sorted(p.name for p in parent.iterdir())
        except OSError:
            return []
        return close_paths(text, siblings, i)
    return []


def no_such_folder(flag: str, text: str, why: str = "") -> CliError:
    """``--flag 'text': no such folder[why]; did you mean a or b?``"""
    hint = suggestions(text)
    return CliError(f"{flag} {text!r}: no such folder{why}" + (f"; did you mean {' or '.join(hint)}?" if hint else "."))


@functools.lru_cache(maxsize=8)
def reach_hub(endpoint: str) -> str | None:
    """None when ``endpoint`` answers one request within PROBE_TIMEOUT_S (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # any failure to get an answer (DNS, refused, timeout, TLS, proxy) means unreachable
        return f"{type(err).__name__}: {one_line(err)[:120]}"
    return None


def hub_problem() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no answer), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "the Hub is offline (HF_HUB_OFFLINE=1): download it on a connected machine (`hf download ID`)"
    failure = reach_hub(constants.ENDPOINT)
    return None if failure is None else f"the Hub ({constants.ENDPOINT}) is unreachable ({failure})"


def check_source(flag: str, text: str, *, bare_is_local: bool, cached: Callable[[str], bool]) -> bool:
    """True when ``text`` is an existing local folder, False when it is a Hub id worth trying (``cached(text)``, or
    the Hub answers); raises a one-line CliError otherwise."""
    path = Path(text).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        raise CliError(f"{flag} {text!r} is a file; expected a folder or a Hugging Face Hub id.")
    if looks_local(text, bare_is_local):
        raise no_such_folder(flag, text)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise no_such_folder(flag, text, " and not a valid Hugging Face Hub id") from None
    if cached(text):
        return False
    problem = hub_problem()
    if problem is not None:
        raise no_such_folder(flag, text, f", not in the Hugging Face cache, and {problem}")
    return False


def _adapter_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "adapter_config.json"), str)


def check_adapter(text: str, flag: str = "--adapter") -> bool:
    """``check_source`` for an adapter: a bare name is a local folder; a Hub id must be cached or reachable."""
    return check_source(flag, text, bare_is_local=True, cached=_adapter_cached)
