"""push_to_hub: upload the adapter files (not the base model) to a Hub repo in one commit, via huggingface_hub.

The files are those ``save_pretrained`` writes (adapter_config.json, adapter_model.safetensors, README.md per
adapter; non-default adapters in their subfolder), written to a temporary folder and sent as one ``create_commit``
of ``CommitOperationAdd`` operations. ``tags`` are added to the model card's metadata.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..peft_model import PeftModel


def _tag_cards(folder: Path, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    for card_path in folder.rglob("README.md"):
        card = ModelCard.load(card_path)
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
        card.save(card_path)


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    tags: list[str] | None = None,
    **save_kwargs: Any,
) -> Any:
    """Create ``repo_id`` if needed and commit the adapter files to it; returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if isinstance(tags, str):
        tags = [tags]
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.save_pretrained(
            folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters, **save_kwargs
        )
        if tags:
            _tag_cards(folder, tags)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
