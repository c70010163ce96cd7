"""Exception and warning classes with PEFT's names (``peft.utils.error`` / ``peft.utils.warning``).

Lowest layer: imports nothing from lorakit, so any module may raise or warn with these.
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of lorakit's own errors (PEFT's name, so ``except PeftError`` code keeps working)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being added matched no module or parameter of the base model (``target_modules`` /
    ``target_parameters`` / ``exclude_modules`` / ``layers_to_transform`` select nothing).

    A ``ValueError`` too, so code that caught the generic error keeps working; code that adds such an adapter on
    purpose can catch this class and go on.
    """


class PeftWarning(UserWarning):
    """Base class of the warnings PEFT gives with its own class (filter them with ``warnings.filterwarnings``)."""
