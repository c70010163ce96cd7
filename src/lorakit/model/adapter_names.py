"""Which adapter names are accepted: a name becomes a ModuleDict key in every layer, a key in state dicts and, for
adapters other than "default", the sub-folder ``save_pretrained`` writes into. So it must be one safe path component.
"""

from __future__ import annotations

import torch.nn as nn

from ..routing import BASE_ADAPTER

_PATH_SEPARATORS = ("/", "\\")


def check_adapter_name(name: object, existing: list[str]) -> None:
    """Raise ValueError naming the problem when ``name`` cannot be a new adapter's name.

    Refused: non-strings, "", names with a dot (a state-dict key separator, also "." and ".."), a path separator
    ("/abs/dir" would make save_pretrained write outside its folder), control characters (NUL fails only at save
    time), the mixed-batch base marker, attributes of nn.ModuleDict, and existing names.
    """
    if not isinstance(name, str):
        raise ValueError(f"Adapter names must be non-empty strings without dots, got {name!r} ({type(name).__name__}).")
    if name in existing:
        raise ValueError(f"Adapter name {name!r} already exists; existing adapters: {sorted(existing)}.")
    if not name or "." in name:
        raise ValueError(f"Adapter names must be non-empty strings without dots, got {name!r}.")
    bad = sorted({c for c in name if c in _PATH_SEPARATORS or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(
            f"Adapter name {name!r} contains {', '.join(repr(c) for c in bad)}: an adapter name is also the folder "
            "save_pretrained writes it into, so it must be a single path component without path separators or "
            "control characters."
        )
    if name == BASE_ADAPTER:
        raise ValueError(f"Adapter name {BASE_ADAPTER!r} is reserved for base-model rows in mixed batches.")
    if hasattr(nn.ModuleDict, name):  # per-adapter ModuleDicts cannot hold a key like "to" or "float"
        raise ValueError(
            f"Adapter name {name!r} is also an attribute of torch.nn.ModuleDict (which holds the adapters' "
            "weights); choose another name."
        )
