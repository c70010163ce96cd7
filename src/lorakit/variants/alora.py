"""aLoRA, activated LoRA (arXiv:2504.12397), as a variant of Linear / Conv1D layers.

The adapter term s * B A dropout(x) is added only on the tokens at or after the start of the invocation sequence
(``LoraConfig(alora_invocation_tokens=[...])``); the offsets come from ``lorakit.alora_offsets`` (computed once per
``PeftModel`` call). Earlier tokens keep the base output exactly, which is what makes the base model's KV cache of
the prefix reusable. With no offsets (a call that bypasses ``PeftModel``: warned; inputs_embeds only: warned by
``alora_scope``) no token is adapted.

The adapted tokens differ per row, so the adapter cannot be folded into the weight: merging raises.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..alora_offsets import AloraActivation, TokenSelection, current_alora
from ..layers.variant import UnmergeableVariant
from . import register_variant

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layers.base import LoraLayer

SUPPORTED_KINDS = ("linear",)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed block recomputing its forward)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class AloraVariant(UnmergeableVariant):
    """One aLoRA adapter on one Linear layer.

    Gradient checkpointing recomputes a block's forward during backward, after ``PeftModel.forward`` has returned
    and its offsets are gone; the variant therefore keeps the offsets of its last forward and reuses them for that
    recomputation. (As in PEFT, that is correct for one forward per backward.)
    """

    name = "alora"
    supports_mixed_batch = True  # forward receives any subset of rows; the offsets follow the routing

    def __init__(self, layer: LoraLayer, config: LoraConfig) -> None:
        if layer.layer_kind not in SUPPORTED_KINDS:
            raise ValueError(
                f"aLoRA (alora_invocation_tokens) supports only Linear / Conv1D layers; {type(layer).__name__} "
                f"{type(layer.get_base_layer()).__name__} is of kind {layer.layer_kind!r}. Remove it from "
                "target_modules."
            )
        tokens = config.alora_invocation_tokens
        if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError(f"alora_invocation_tokens must be a non-empty list of token ids (int), got {tokens!r}.")
        self.invocation_tokens = list(tokens)
        self._last: AloraActivation | None = None

    def __repr__(self) -> str:
        return f"AloraVariant(invocation_tokens={self.invocation_tokens})"

    def _activation(self) -> AloraActivation | None:
        active = current_alora()
        if active is None and _in_backward():
            return self._last  # recomputation of a checkpointed block
        self._last = active  # also under no_grad: reentrant checkpointing runs the first forward without grad
        return active

    # ------------------------------------------------------------------ protocol
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """aLoRA has no parameters of its own."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the adapter term on the activated tokens.

        Args:
            x: (n, T, in) or (n, in) (one token per row)
            result: (n, T, out) or (n, out), the output so far
        Returns:
            same shape and dtype as ``result``
        """
        if x.dim() not in (2, 3):
            raise ValueError(f"aLoRA expects layer inputs of shape (batch, tokens, features); got {tuple(x.shape)}.")
        rows, tokens = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        activation = self._activation()
        if activation is None:
            warnings.warn(
                f"aLoRA adapter {adapter_name!r} got no invocation offsets: the model was called directly instead of "
                "through PeftModel.forward / generate, so the adapter adapts no token.",
                stacklevel=2,
            )
            selection = TokenSelection(False, torch.zeros(0, dtype=torch.long, device=x.device))
        else:
            selection = activation.token_selection(adapter_name, rows, tokens, x.device)
        if selection.everything:
            return result + layer._lora_term(adapter_name, x).to(result.dtype)
        # Only the activated tokens go through A and B; an empty selection still gives the factors zero gradients.
        x_flat = x.reshape(-1, x.shape[-1])  # (n * T, in)
        term = layer._lora_term(adapter_name, x_flat.index_select(0, selection.index))  # (m, out)
        out = result.reshape(-1, result.shape[-1]).index_add(0, selection.index, term.to(result.dtype))
        return out.reshape(result.shape)

    def check_mergeable(self, layer: LoraLayer, adapter_name: str) -> None:
        raise ValueError(
            f"aLoRA adapter {adapter_name!r} cannot be merged: it adapts only the tokens after its invocation, which "
            "differ per input, so no single weight reproduces it. Keep it unmerged."
        )


register_variant("alora", lambda c: c.alora_invocation_tokens is not None, AloraVariant)
