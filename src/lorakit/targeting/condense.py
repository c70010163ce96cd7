"""Condense a long ``target_modules`` list into the shortest suffixes that still pick exactly the same modules.

PEFT does this for lists of 20 entries or more (an ``all-linear`` expansion included), so the saved config names
``q_proj``, ``v_proj``, ... instead of every full path, and can be reused on a deeper model of the same family.
For each target (in a fixed order) the shortest dotted suffix that no other module name ends with is kept, unless a
suffix kept earlier already covers it. Matching with the result (exact name or ``endswith("." + suffix)``) selects
the same modules as the full list.
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_TARGETS_TO_CONDENSE = 20
"""PEFT's threshold: shorter lists are kept as given."""


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of ``name``, shortest first: 'a.b.c' -> ['c', 'b.c', 'a.b.c']."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def minimal_suffixes(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """The fewest short suffixes that cover every target and no name in ``others`` (disjoint from ``targets``)."""
    targets = set(targets)
    blocked = {suffix for name in others for suffix in _suffixes(name)}
    kept: set[str] = set()
    for target, suffixes in sorted(((t, _suffixes(t)) for t in targets), key=lambda item: item[1]):
        if any(target == k or target.endswith("." + k) for k in kept):
            continue
        kept.add(next((s for s in suffixes if s not in blocked), target))
    return kept


def condense_target_modules(targets: list[str] | str | None, module_names: Iterable[str]) -> list[str] | str | None:
    """``targets`` condensed as PEFT does when it is a list of at least 20 entries; anything else unchanged.

    Args:
        targets: config.target_modules after 'all-linear' / default resolution
        module_names: every module path of the model
    """
    if isinstance(targets, str) or targets is None or len(set(targets)) < MIN_TARGETS_TO_CONDENSE:
        return targets
    wanted = set(targets)
    suffixes = tuple("." + t for t in wanted)
    others = [n for n in module_names if n not in wanted and not n.endswith(suffixes)]
    condensed = minimal_suffixes(wanted, others)
    return sorted(condensed) if len(condensed) < len(wanted) else targets
