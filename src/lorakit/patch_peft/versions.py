"""Which peft the patch was tested with, and the peft classes and layer attributes it relies on.

peft is imported here, lazily (on the first ``patch_peft`` call): ``import lorakit`` never needs it. Another peft
version gets a warning; a layer that lacks an attribute the patch reads is refused with an error naming it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

TESTED_PEFT_VERSIONS: tuple[str, ...] = ("0.21.2",)
"""peft releases ``tests/patch_peft`` ran against (outputs, gradients and 20 AdamW steps equal unpatched peft)."""

LAYER_ATTRIBUTES: tuple[str, ...] = (
    "base_layer",
    "lora_A",
    "lora_B",
    "lora_dropout",
    "lora_magnitude_vector",
    "lora_variant",
    "lora_bias",
    "scaling",
    "merged_adapters",
    "_disable_adapters",
    "_active_adapter",
    "fan_in_fan_out",
    "in_features",
    "out_features",
)
"""Instance attributes of a peft LoRA Linear that the patched forward reads (peft's names, in its layout)."""

CLASS_ATTRIBUTES: tuple[str, ...] = ("forward", "_check_forward_args")


@dataclass(frozen=True)
class PeftApi:
    """The peft objects the patch uses: the LoRA ``Linear`` class, DoRA's variant and magnitude classes, the module
    holding ``ENABLE_DORA_CACHING``, the ``LoraLayer`` base (to name layers the patch leaves alone), and the
    ``PeftModel`` / ``BaseTuner`` wrappers (to find the transformers model under them)."""

    version: str
    linear: type
    lora_layer: type
    dora_variant: type
    dora_layer: type
    dora_module: Any
    peft_model: type
    base_tuner: type

    def dora_caching(self) -> bool:
        """peft caches DoRA norms in eval mode when this flag is set: its forward is kept then (exact caching)."""
        return bool(getattr(self.dora_module, "ENABLE_DORA_CACHING", False))


@functools.cache
def peft_api() -> PeftApi:
    """Import peft and find the classes the patch relies on; warn once for an untested version.

    Raises ImportError without peft, RuntimeError when a class or method the patch relies on is missing.
    """
    try:
        peft = importlib.import_module("peft")
    except ImportError as err:
        message = "lorakit.patch_peft needs peft installed (`pip install peft`): it patches peft models."
        raise ImportError(message) from err
    version = getattr(peft, "__version__", "unknown")
    if version not in TESTED_PEFT_VERSIONS:
        warnings.warn(
            f"lorakit.patch_peft was tested with peft {', '.join(TESTED_PEFT_VERSIONS)}; found peft {version}. The "
            "patch checks every layer attribute it reads and refuses layers that lack one, but compare a few "
            "outputs with lorakit.unpatch_peft(model) before relying on it.",
            stacklevel=3,
        )
    try:
        layer_module = importlib.import_module("peft.tuners.lora.layer")
        variants = importlib.import_module("peft.tuners.lora.variants")
        dora_module = importlib.import_module("peft.tuners.lora.dora")
        tuners = importlib.import_module("peft.tuners.tuners_utils")
        api = PeftApi(
            version,
            layer_module.Linear,
            layer_module.LoraLayer,
            variants.DoraLinearVariant,
            dora_module.DoraLinearLayer,
            dora_module,
            peft.PeftModel,
            tuners.BaseTuner,
        )
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"lorakit.patch_peft cannot patch peft {version}: {err}. Tested with peft "
            f"{', '.join(TESTED_PEFT_VERSIONS)} (peft.tuners.lora.layer.Linear / LoraLayer, "
            "peft.tuners.lora.variants.DoraLinearVariant, peft.tuners.lora.dora.DoraLinearLayer)."
        ) from err
    missing = [name for name in CLASS_ATTRIBUTES if not hasattr(api.linear, name)]
    if missing:
        raise RuntimeError(f"lorakit.patch_peft cannot patch peft {version}: peft's lora Linear lacks {missing}.")
    return api


def missing_attributes(layer: Any) -> list[str]:
    """The ``LAYER_ATTRIBUTES`` a peft LoRA Linear instance lacks (in its ``__dict__`` or as module children)."""
    state = layer.__dict__
    modules = state.get("_modules", {})
    return [name for name in LAYER_ATTRIBUTES if name not in state and name not in modules]
