"""A fused node's output, handed back so that the caller may edit it in place, as a plain ``nn.Linear``'s output.

Models edit projection outputs in place (``q /= sqrt(d)``, ``x += residual``). Two things would make that fail on
a custom autograd node where the plain layer allows it:

* the output is a view made inside the node (the (N, out) -> (..., out) reshape): autograd refuses an in-place edit
  of such a view ("Output 0 of ... is a view and is being modified inplace"), since rebasing the view's history
  would bypass the node's backward. ``as_output`` gives the fresh (N, out) tensor its (..., out) shape in place
  instead (``resize_`` to the same number of elements: metadata only, the storage untouched), so the output is no
  view at all, and it costs less host time than ``view``.
* the node keeps its own output for backward (DoRA's magnitude gradient reads y): saved the usual way, an edit makes
  backward raise autograd's version error. ``keep_output`` keeps it aside with its version instead, and
  ``kept_output`` gives it back in backward only if it is unchanged; otherwise (or after a first backward: it is
  released then, as saved tensors are) None, and the node forms what it needs again from its inputs. The edit's
  own node has already carried the gradient through the edit, so the node only needs its output as it was.

Under saved-tensor hooks (non-reentrant checkpointing, offloading to CPU) the output goes through
``save_for_backward`` as usual, as an alias with a version counter of its own (so saving it never trips the
version check), and a storage-less probe that shares the output's counter tells whether it was edited: the hooks
still decide where the kept output lives.
"""

from __future__ import annotations

from typing import Any

import torch

from .eligibility import saved_tensor_hooks_active

_ATTR = "lorakit_kept_output"
_unsafe_view = torch.ops.aten._unsafe_view.default


def as_output(out: torch.Tensor, lead: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``out`` shaped (*lead, out_features) in place: the same tensor (not a view), or ``out`` when it has that shape.

    Args:
        out: (N, out_features), freshly made by the node (does not require grad), N = prod(lead)
    """
    if len(lead) == out.dim() - 1:  # (N, out) from (N, in): nothing to reshape
        return out
    if not out.is_contiguous():  # resize_ lays the storage out row-major: only a row-major tensor keeps its values
        out = out.contiguous()
    return out.resize_((*lead, out.shape[-1]))


def keep_output(ctx: Any, out: torch.Tensor) -> torch.Tensor | None:
    """Keep ``out`` for ``kept_output`` in backward; returns the tensor to pass to ``save_for_backward`` in its
    place (None when it is kept on ``ctx``). Call after every change to ``out`` in the forward."""
    if out.is_inference():  # made under inference_mode: no backward will ask, and no version to compare
        setattr(ctx, _ATTR, None)
        return None
    if saved_tensor_hooks_active():
        probe = out[:0]
        probe.set_()  # shares out's version counter, holds none of its storage
        setattr(ctx, _ATTR, (None, probe, probe._version))
        return _unsafe_view(out, out.shape)  # same storage, a version counter of its own
    alias = out.detach()  # shares storage and version counter, no graph: no reference cycle through ctx
    setattr(ctx, _ATTR, (alias, alias, alias._version))
    return None


def kept_output(ctx: Any, saved: torch.Tensor | None) -> torch.Tensor | None:
    """The output ``keep_output`` kept, if the caller has not edited it in place since; else None (form it again).

    Args:
        saved: what ``keep_output`` returned, as read back from ``ctx.saved_tensors``
    """
    held = getattr(ctx, _ATTR, None)
    setattr(ctx, _ATTR, None)  # released with the saved tensors; a second backward (retain_graph) forms it again
    if held is None:
        return None
    alias, probe, version = held
    if probe._version != version:
        return None
    return alias if alias is not None else saved
