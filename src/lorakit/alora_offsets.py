"""Activated LoRA (aLoRA, arXiv:2504.12397): where each row's invocation starts, made visible to every layer.

An aLoRA adapter adapts only the tokens from the start of the LAST occurrence of its ``alora_invocation_tokens`` on;
earlier tokens see the base model, so a base-model KV cache of the shared prefix can be reused. As PEFT, the start
is kept as an offset from the end of the row:

    offset = T - start          (None when the row has no occurrence, or its adapter is "__base__" / another one)
    token t of the row is adapted  <=>  t >= T - offset

``PeftModel.forward`` / ``generate`` compute the offsets from ``input_ids`` once per call (``alora_scope``) and make
them visible to that call only, in a ``CallScoped`` slot like ``lorakit.routing`` (per thread / task, removed on
exit): only aLoRA layers read it, so plain adapters keep a graph-break free forward under torch.compile.

Generation: offsets come from the prompt. With a KV cache each decode step holds only new tokens, all after the
invocation, hence all adapted (``min(offset, T) = T``). Without a cache every step re-reads the whole sequence of
T = prompt + k tokens; the invocation has not moved, so the offset grows by k (PEFT keeps it fixed, which slides the
adapted window). Rows repeated for sampling with ``num_return_sequences`` repeat their offsets.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .routing import CallScoped, current_routing

if TYPE_CHECKING:
    from .peft_model import PeftModel


def invocation_offsets(input_ids: torch.Tensor, invocation: Sequence[int]) -> list[int | None]:
    """Per row: seq_len minus the start of the last occurrence of ``invocation``, or None without one.

    Args:
        input_ids: (B, T) token ids (a 1-D (T,) sequence is one row)
        invocation: the invocation token ids, non-empty
    Returns:
        B offsets, each in [len(invocation), T] or None. ``[[0,1,2,3],[0,4,5,6]]`` with ``[1,2]`` -> ``[3, None]``.
    """
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    rows, length = ids.shape
    n = len(invocation)
    if n == 0 or length < n:
        return [None] * rows
    pattern = torch.tensor(list(invocation), dtype=ids.dtype, device=ids.device)
    hits = (ids.unfold(1, n, 1) == pattern).all(dim=-1)  # (B, T - n + 1): an occurrence starts here
    starts = torch.arange(hits.shape[1], device=ids.device)
    last = torch.where(hits, starts, torch.full_like(starts, -1)).max(dim=1).values  # (B,)
    return [None if s < 0 else length - s for s in last.tolist()]


class TokenSelection(NamedTuple):
    """The tokens an aLoRA adapter adapts in one layer input of (rows, T) tokens."""

    everything: bool
    index: torch.Tensor  # (m,) long: positions among the flattened rows * T tokens, ascending


@dataclass
class AloraActivation:
    """The aLoRA offsets of one model call (or one generate).

    ``offsets[name]``: (B,) long, the offset of each row for adapter ``name`` (0: not adapted). ``prompt_len``: T of
    the input they were computed from. ``generation``: rows may be repeated k times (sampling) and, without a KV
    cache, layers see prompt + k tokens.
    """

    offsets: dict[str, torch.Tensor]
    prompt_len: int
    generation: bool = False
    _selections: dict[tuple, TokenSelection] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(next(iter(self.offsets.values()))) if self.offsets else 0

    def token_selection(self, adapter: str, rows: int, tokens: int, device: torch.device) -> TokenSelection:
        """Which tokens of a layer input adapter ``adapter`` adapts, as (all of them?, flat indices).

        ``rows`` is the layer's batch: B, k * B in generation, or (mixed batch) the rows routed to ``adapter``; the
        input has ``tokens`` tokens per row. Cached per call, so decode steps and deeper layers reuse it.
        Raises ValueError when ``rows`` does not fit the batch the offsets were computed for.
        """
        routing = current_routing()
        key = (adapter, rows, tokens, device, id(routing))
        selection = self._selections.get(key)
        if selection is None:
            offsets = self._row_offsets(adapter, rows, routing)
            if self.generation and tokens > self.prompt_len:  # no KV cache: the sequence grew by generated tokens
                offsets = torch.where(offsets > 0, offsets + (tokens - self.prompt_len), offsets)
            offsets = offsets.clamp(max=tokens)
            positions = torch.arange(tokens)
            mask = positions.unsqueeze(0) >= (tokens - offsets).unsqueeze(1)  # (rows, T)
            index = mask.reshape(-1).nonzero().squeeze(1)  # (m,) positions among the flattened rows * T tokens
            selection = TokenSelection(bool(mask.all()), index.to(device))
            self._selections[key] = selection
        return selection

    def _row_offsets(self, adapter: str, rows: int, routing: Any) -> torch.Tensor:
        """(rows,) long offsets of the rows a layer call of ``adapter`` holds."""
        batch = self.batch_size
        offsets = self.offsets.get(adapter)
        if offsets is None:
            return torch.zeros(rows, dtype=torch.long)
        group = routing.groups.get(adapter) if routing is not None else None
        size = len(group) if group is not None else batch
        repeat = rows // size if size and rows % size == 0 else 0
        if repeat == 0 or (repeat > 1 and not self.generation):
            raise ValueError(
                f"aLoRA adapter {adapter!r} received a batch of {rows} rows, but its offsets were computed for "
                f"{size} rows{' (or a multiple, in generation)' if self.generation else ''}. aLoRA needs one row of "
                "input_ids per layer row (models that flatten or reorder rows are not supported)."
            )
        offsets = offsets.repeat_interleave(repeat)
        if group is not None:
            offsets = offsets[routing.for_batch(repeat * len(routing)).groups[adapter]]
        return offsets


_ACTIVE: CallScoped[AloraActivation] = CallScoped("lorakit_alora_activation")


def current_alora() -> AloraActivation | None:
    """The aLoRA offsets of the call this thread is computing, or None outside ``PeftModel.forward`` / ``generate``
    (aLoRA adapters then adapt no token, with a warning)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate_alora(activation: AloraActivation | None) -> Iterator[AloraActivation | None]:
    """Make ``activation`` visible to every aLoRA layer inside the block, in this thread / task only; removed on exit,
    also by an exception."""
    with _ACTIVE.scope(activation):
        yield activation


# ---------------------------------------------------------------------- from a PeftModel call
def alora_adapters(model: PeftModel, adapter_names: Sequence[str] | None = None) -> list[str]:
    """The aLoRA adapters a call uses: those named in ``adapter_names`` (mixed batch) or the active ones."""
    configs = model.peft_config
    candidates = model.active_adapters if adapter_names is None else dict.fromkeys(adapter_names)
    return [n for n in candidates if n in configs and configs[n].alora_invocation_tokens is not None]


def compute_activation(
    model: PeftModel,
    input_ids: torch.Tensor,
    adapter_names: Sequence[str] | None = None,
    generation: bool = False,
) -> AloraActivation:
    """Offsets of every aLoRA adapter of the call for each row of ``input_ids`` ((B, T) or (T,)).

    Without ``adapter_names`` every row uses every active aLoRA adapter; with it, row i uses ``adapter_names[i]``
    only (``__base__`` rows and rows of other adapters get no offset).
    """
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    offsets: dict[str, torch.Tensor] = {}
    for name in alora_adapters(model, adapter_names):
        found = invocation_offsets(ids, model.peft_config[name].alora_invocation_tokens)
        if adapter_names is not None:
            found = [o if row_name == name else None for o, row_name in zip(found, adapter_names)]
        offsets[name] = torch.tensor([o or 0 for o in found], dtype=torch.long)
    return AloraActivation(offsets, prompt_len=ids.shape[-1], generation=generation)


def _input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def _uses_beam_search(model: PeftModel, kwargs: dict[str, Any], generation: bool) -> bool:
    """generate(): ``num_beams`` of the call or of the generation config; forward(): a ``num_beams`` keyword (as PEFT
    checks both)."""
    beams = kwargs.get("num_beams")
    if generation:
        config = kwargs.get("generation_config") or getattr(model.get_base_model(), "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1))
    return isinstance(beams, int) and beams > 1


@contextlib.contextmanager
def alora_scope(
    model: PeftModel,
    args: tuple,
    kwargs: dict[str, Any],
    adapter_names: Sequence[str] | None = None,
    generation: bool = False,
) -> Iterator[AloraActivation | None]:
    """The aLoRA offsets of one ``forward`` / ``generate`` call of ``model``, active inside the block.

    A no-op when the call uses no aLoRA adapter. Raises ValueError for beam search (``num_beams`` > 1); warns and
    adapts no token when there are no ``input_ids`` to search (``inputs_embeds`` only).
    """
    names = alora_adapters(model, adapter_names)
    if not names:
        yield None
        return
    if _uses_beam_search(model, kwargs, generation):
        raise ValueError(f"Beam search is not supported with aLoRA adapters ({names}); use greedy or sampling.")
    input_ids = _input_ids(args, kwargs)
    activation = AloraActivation({}, prompt_len=0, generation=generation)  # no offsets: no token adapted
    if input_ids is None:
        warnings.warn(
            f"aLoRA adapters {names} need input_ids to find their invocation tokens; got "
            f"{'only inputs_embeds' if kwargs.get('inputs_embeds') is not None else 'none'}, so they adapt no token "
            "in this call.",
            stacklevel=4,
        )
    else:
        activation = compute_activation(model, input_ids, adapter_names, generation)
    with activate_alora(activation):
        yield activation
