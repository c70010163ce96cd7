"""MiCA, Minor Component Adaptation (arXiv:2604.01694; PEFT's ``init_lora_weights="mica"``).

B is set to the r left singular vectors of W with the *smallest* singular values and frozen; A starts at zero and is
the only factor that trains. W = U S Vh (float32, (out, in)); B = U[:, -r:] (out, r), A = 0 (r, in). Since A = 0
the adapter is a no-op at initialisation and W is left unchanged. Linear/Conv1D and Embedding layers (for an
Embedding the (out, in) view is W^T, (embedding_dim, num_embeddings)), as in PEFT.
"""

from __future__ import annotations

import torch

from .registry import InitRequest, InitResult, register_init
from .residual import matrix_weight, require_float_base


@register_init("mica", layer_kinds={"linear", "embedding"}, frozen=frozenset({"B"}))
def init_mica(req: InitRequest) -> InitResult:
    require_float_base(req, "mica")
    weight = matrix_weight(req, "mica")  # (out, in) float32
    if req.rank > min(weight.shape):
        raise ValueError(
            f"init_lora_weights='mica' takes the last r left singular vectors of the weight, but layer "
            f"{req.module_name!r} has a {tuple(weight.shape)} weight (at most {min(weight.shape)}) and r={req.rank}. "
            "Lower r for this layer (rank_pattern)."
        )
    u, _, _ = torch.linalg.svd(weight, full_matrices=False)  # (out, k), singular values descending
    lora_b = u[:, -req.rank :].contiguous()  # (out, r): the minor components
    lora_a = torch.zeros(req.a_shape, dtype=weight.dtype, device=weight.device)  # (r, in)
    return InitResult(lora_a, lora_b)
