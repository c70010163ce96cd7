"""Building the adapter for ``lorakit train``: target checks, inits that need data (EVA, CorDA) and inits that change
the base weights (PiSSA, OLoRA, CorDA), whose adapters are saved converted for the original base model."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from .errors import CliError, one_line


def _check_each_target(model: Any, targets: Any) -> None:
    """Every listed target module must name some module (the library only fails when none matches)."""
    if not isinstance(targets, list):
        return
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not any(m.children())})
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            close = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CliError(
                f"--target-modules: no module is named {target!r}; {hint}the model's module names are: "
                f"{', '.join(leaves[:40])}{' ...' if len(leaves) > 40 else ''}."
            )


def _corda_before(model: Any, config: Any, batches: list[dict]) -> None:
    from ..init.corda import preprocess_corda

    def run_model() -> None:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    preprocess_corda(model, config, run_model=run_model)


def _eva_after(peft_model: Any, config: Any, batches: list[dict]) -> None:
    from ..init.eva import initialize_lora_eva_weights

    initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)


BASE_CHANGING_INITS = ("pissa", "olora", "corda")
"""Inits that move s * B0 @ A0 out of the base weight: the saved adapter is converted to a plain rank-2r LoRA adapter
(``save_pretrained(path_initial_model_for_weight_conversion=...)``) so that it applies to the original base model."""


def changes_base(config: Any) -> bool:
    return isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(BASE_CHANGING_INITS)


DATA_DRIVEN_INITS: dict[str, tuple[str, Any]] = {"corda": ("before", _corda_before), "eva": ("after", _eva_after)}
"""init_lora_weights that need data -> (when, function): 'before' runs on the plain model, 'after' on the PeftModel."""


def build_peft_model(model: Any, config: Any, calibration: list[dict]) -> Any:
    from ..mapping import get_peft_model

    _check_each_target(model, config.target_modules)
    when, prepare = DATA_DRIVEN_INITS.get(str(config.init_lora_weights), (None, None))
    try:
        if when == "before":
            prepare(model, config, calibration)
        peft_model = get_peft_model(model, config)
        if when == "after":
            prepare(peft_model, config, calibration)
    except (ValueError, TypeError, ImportError, NotImplementedError) as err:
        raise CliError(one_line(err)) from None
    return peft_model


def save_trained_adapter(
    peft_model: Any, out: Path, initial: Path, model_id: str, state_dict: dict | None = None
) -> str | None:
    """Save the adapter in PEFT's format; after a base-changing init convert it (rank 2r) for the original base.
    ``state_dict``: the adapter's tensors gathered whole from FSDP2 shards (``gather_adapter_state_dict``).

    Returns a note for the user when it converted."""
    config = peft_model.peft_config["default"]
    if not changes_base(config):
        peft_model.save_pretrained(out, **({} if state_dict is None else {"state_dict": state_dict}))
        return None
    if not initial.is_dir():
        raise CliError(f"{initial} is missing: the {config.init_lora_weights!r} adapter cannot be converted.")
    try:
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
    except ValueError as err:
        raise CliError(f"cannot save the {config.init_lora_weights!r} adapter: {one_line(err)}") from None
    return (
        f"init {config.init_lora_weights!r} changed the base weights during training; saved as a plain LoRA adapter "
        f"of rank {2 * config.r} that applies to the original {model_id}"
    )
