"""Keep your peft code: lorakit's fused LoRA nodes for existing peft models.

``lorakit.patch_peft(model)`` makes the peft LoRA Linears of ``model`` (a ``peft.PeftModel``, or a transformers model
with peft adapters attached) compute through lorakit's fast paths where they apply, decided per call, and peft's own
forward everywhere else; ``lorakit.unpatch_peft(model)`` undoes it exactly. The module tree, parameters, state_dict
keys and every peft method (save, load, set_adapter, merge, disable_adapter) stay peft's.

| file | concept |
| --- | --- |
| ``versions.py`` | peft imported lazily; tested versions; the attributes relied on |
| ``view.py`` | a peft layer seen through the attributes lorakit's kernels read (no copies) |
| ``dora.py`` | peft's DoRA through lorakit's fused DoRA node |
| ``forward.py`` | the per-call choice: fused node, gathered mixed batch, or peft's forward |
| ``patched_class.py`` | the class a patched layer takes (peft's, with that forward) |
| ``scope.py`` | the per-call scope (factor casts, shared-input groups, mixed routing) via forward hooks |
| ``patch.py`` | ``patch_peft`` / ``unpatch_peft`` |

Nothing here imports peft at import time.
"""

from .patch import patch_peft, unpatch_peft
from .versions import TESTED_PEFT_VERSIONS

__all__ = ["TESTED_PEFT_VERSIONS", "patch_peft", "unpatch_peft"]
