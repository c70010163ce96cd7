"""Trainable tokens: replacement rows for a few token ids of an embedding matrix, per adapter.

Each adapter stores ``trainable_tokens_delta[name]`` (n_tokens, dim), initialised from W[indices]. The rows *replace*
the base rows (they are not added): retraining on a resized vocabulary whose new rows were re-randomised stays well
defined. At forward time only the looked-up positions are overwritten in the base output, so no copy of the full
embedding is made and only the selected rows get gradients.

The same rows also drive an output head tied to the embedding (``lm_head.weight is embed_tokens.weight``): for a
Linear head the logits of the selected ids are recomputed from the rows. A head follows another adapter's rows
(``follow``); the rows are stored, and saved, once, on the embedding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class BufferDict(nn.Module):
    """Per-adapter tensors that move with the module (``.to()``) but are not part of the state dict."""

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)


def check_token_indices(indices: object, vocab_size: int, where: str) -> list[int]:
    """The indices as a list of ints; ValueError for non-integers, duplicates or ids outside [0, vocab_size)."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(
            f"trainable_token_indices for {where!r} must be a non-empty list of token ids, got {indices!r}."
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"trainable_token_indices for {where!r} must be integers, got {list(indices)!r}.")
    bad = [i for i in indices if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"trainable_token_indices for {where!r}: token ids {bad} are out of range; the vocabulary of {where!r} "
            f"has {vocab_size} tokens (valid ids 0..{vocab_size - 1})."
        )
    duplicates = sorted(i for i, count in Counter(indices).items() if count > 1)
    if duplicates:
        raise ValueError(f"trainable_token_indices for {where!r} lists token ids {duplicates} more than once.")
    return list(indices)


class TokenAdapter(nn.Module):
    """Token rows of every adapter on one ``base_layer`` (nn.Embedding, or an nn.Linear head with weight (V, dim)).

    PEFT's names: ``trainable_tokens_delta`` (saved), ``trainable_tokens_original`` (for unmerge, not saved),
    ``token_indices``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original = BufferDict()
        self.token_indices: dict[str, list[int]] = {}
        self._index = BufferDict()
        self._followed: dict[str, TokenAdapter] = {}  # adapter -> the adapter owning its rows (a tied embedding)

    @property
    def vocab_size(self) -> int:
        return self.base_layer.weight.shape[0]

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, indices: list[int], autocast_adapter_dtype: bool = True) -> None:
        """Own rows for ``name``, initialised from W[indices] (float32 on fp16/bf16 bases when autocasting)."""
        weight = self.base_layer.weight
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        original = weight.detach()[index].clone()  # (n, dim)
        dtype = weight.dtype
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        self.trainable_tokens_delta[name] = nn.Parameter(original.to(dtype, copy=True))
        self.trainable_tokens_original[name] = original
        self._index[name] = index
        self.token_indices[name] = list(indices)

    def follow(self, name: str, source: TokenAdapter) -> None:
        """Use ``source``'s rows of ``name`` (a head tied to the embedding that ``source`` wraps)."""
        self._followed[name] = source

    def owner(self, name: str) -> TokenAdapter:
        return self._followed.get(name, self)

    def has(self, name: str) -> bool:
        return name in self.token_indices or name in self._followed

    def owns(self, name: str) -> bool:
        return name in self.token_indices

    def remove(self, name: str) -> None:
        if self.owns(name):
            del self.trainable_tokens_delta[name]
            del self.trainable_tokens_original[name]
            del self._index[name]
            del self.token_indices[name]
        self._followed.pop(name, None)

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids (n,) long, replacement rows (n, dim)) of adapter ``name``."""
        owner = self.owner(name)
        return owner._index[name], owner.trainable_tokens_delta[name]

    def check_disjoint(self, names: list[str]) -> None:
        """Adapters used together must change different tokens (which one would win is undefined otherwise)."""
        seen: dict[int, str] = {}
        for name in names:
            for token in self.owner(name).token_indices[name]:
                if token in seen and seen[token] != name:
                    raise ValueError(
                        f"Adapters {seen[token]!r} and {name!r} both train token {token}; adapters used or merged "
                        "together must train disjoint trainable_token_indices."
                    )
                seen[token] = name

    # ------------------------------------------------------------------ forward
    def apply(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The base output ``out`` of ``x`` with the rows of ``names`` written in.

        Args:
            x: Embedding: token ids (...,); Linear head: hidden states (..., dim)
            out: base_layer(x): (..., dim) embeddings or (..., V) logits
        Returns:
            like out
        """
        if isinstance(self.base_layer, nn.Embedding):
            for name in names:
                out = self._replace_embeddings(x, out, name)
            return out
        for name in names:
            out = self._replace_logits(x, out, name)
        return out

    def _replace_embeddings(self, ids: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        index, delta = self.rows(name)
        sorted_ids, order = index.sort()
        slot = torch.searchsorted(sorted_ids, ids).clamp_(max=index.numel() - 1)  # (...,) position among the ids
        hit = sorted_ids[slot] == ids  # (...,) True where the token is a trainable one
        rows = delta.to(self.base_layer.weight.dtype)[order[slot]]  # (..., dim), gradient only into delta
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:  # scaled embeddings (e.g. Gemma) scale their output; replaced rows follow
            rows = rows * (embed_scale.to(rows.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)

    def _replace_logits(self, hidden: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        index, delta = self.rows(name)
        bias = getattr(self.base_layer, "bias", None)
        weight = delta.to(self.base_layer.weight.dtype)
        # (..., dim) @ (dim, n) -> (..., n): the logits of the trainable tokens, from their new rows
        logits = F.linear(hidden, weight, None if bias is None else bias[index])
        return out.index_copy(out.dim() - 1, index, logits.to(out.dtype))

    def effective_weight(self, names: list[str]) -> torch.Tensor:
        """W with the rows of ``names`` written in: a new (V, dim) tensor (only for code that reads ``.weight``)."""
        weight = self.base_layer.weight
        for name in names:
            index, delta = self.rows(name)
            weight = weight.index_copy(0, index, delta.to(weight.dtype))
        return weight

    # ------------------------------------------------------------------ merge
    def write_rows(self, name: str, merged: bool) -> None:
        """Write the adapter's rows (merge) or the original rows (unmerge) into the base weight."""
        owner = self.owner(name)
        weight = self.base_layer.weight
        source = owner.trainable_tokens_delta[name] if merged else owner.trainable_tokens_original[name]
        with torch.no_grad():
            weight.index_copy_(0, owner._index[name].to(weight.device), source.detach().to(weight))
