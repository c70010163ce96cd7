"""LoRA on nn.Embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoraLayer
from .record import AdapterRecord


class Embedding(LoraLayer):
    """y = E[x] + s * A^T[x] @ B^T. No dropout on the LoRA path (PEFT's math). Default init: A = 0, B ~ N(0, 1)."""

    layer_kind = "embedding"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _check_supported(self, adapter_name, record, config, module_name) -> None:
        if record.lora_bias:
            raise ValueError(f"lora_bias=True is not supported on Embedding layer {module_name!r}.")

    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(record.r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, record.r))

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (num_embeddings, dim) -> (dim, num_embeddings)

    def _weight_from_2d(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            ids,
            table,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        # ids (B, T) -> (B, T, r) @ (r, dim) -> (B, T, dim)
        term = (self._embed(x, lora_a.T) @ lora_b.T) * self.adapters[name].scaling
        embed_scale = getattr(self.get_base_layer(), "embed_scale", None)
        if embed_scale is not None:  # scaled embeddings (e.g. Gemma) scale their output; the adapter term follows
            term = term * (embed_scale.to(term.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return term
