"""The model card (README.md) beside a saved adapter, with the metadata PEFT writes, so Hub tooling treats a lorakit
adapter as a PEFT one.

Created from huggingface_hub's default template, or updated when the folder already has a card (the user's text
and metadata are kept): ``library_name: peft``; ``tags`` = the base model's ``model_tags`` plus ``transformers``
(transformers models), ``lora`` and ``base_model:adapter:<name_or_path>`` (models with a ``name_or_path``);
``pipeline_tag: text-generation`` for causal LMs when unset; ``base_model`` from the model config's
``_name_or_path`` (so nothing for a plain torch model); and a "Framework versions" line naming the PEFT format
version lorakit writes (``PEFT_COMPAT_VERSION``, the ``peft_version`` of the config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.lora_config import PEFT_COMPAT_VERSION

if TYPE_CHECKING:
    from ..peft_model import PeftModel

FRAMEWORK_HEADING = "### Framework versions"


def card_tags(model: PeftModel) -> list[str]:
    """The tags PEFT puts on an adapter's card, sorted."""
    base = model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        from transformers import PreTrainedModel

        if isinstance(base, PreTrainedModel):
            tags.add("transformers")
    except ImportError:  # transformers is a dependency, but a card must never fail a save
        pass
    tags.add("lora")
    if hasattr(base, "name_or_path"):
        tags.add(f"base_model:adapter:{base.name_or_path}")
    return sorted(tags)


def _model_config(model: PeftModel) -> dict:
    config = getattr(model.get_base_model(), "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _with_version(text: str) -> str:
    lines = text.splitlines()
    version_line = f"- PEFT {PEFT_COMPAT_VERSION}"
    if version_line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, version_line)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{version_line}")
    return "\n".join(lines)


def model_card_text(model: PeftModel, existing: str | None) -> str:
    """The README.md to write: ``existing`` (a card already in the folder) updated, or a new card."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(existing) if existing is not None else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    card.data.tags = card_tags(model)
    causal_lm = any(cls.__name__ == "PeftModelForCausalLM" for cls in type(model).__mro__)  # no upward import
    if not card.data.pipeline_tag and causal_lm:
        card.data.pipeline_tag = "text-generation"
    config = _model_config(model)
    if "_name_or_path" in config:
        card.data.base_model = config["_name_or_path"]
    card.text = _with_version(card.text)
    return str(card)
