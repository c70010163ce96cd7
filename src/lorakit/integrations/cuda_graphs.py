"""A training step (forward + backward) captured once as a CUDA graph and replayed: no host work per layer.

An eager LoRA step issues a few thousand kernels, and each costs host time (Python, dispatch, launch); on a slow host
CPU the device waits for the host (docs/benchmarks.md, "Host speed decides the training rows"). A CUDA graph
(``torch.cuda.CUDAGraph``) records the kernels of one step once and replays them with one launch, so a replayed step
takes the device time alone, whatever the host::

    step = CudaGraphStep(model, example_batch)   # warm-up steps and the capture happen here
    for batch in loader:
        loss = step(batch)                       # copies the batch into the graph's inputs, replays fwd + bwd
        optimizer.step()                         # eager, as usual: LR schedulers, LoRA+, clipping ... all work
        optimizer.zero_grad()

What a graph requires, and how this class meets it:

* static shapes: every batch has the example batch's keys, shapes and dtypes (pad to a fixed length); anything else
  raises an error that names the key;
* static memory: each batch is copied into tensors the graph reads; the gradients live where the capture put them,
  and a call puts them back on ``.grad`` when ``zero_grad(set_to_none=True)`` dropped them;
* no host synchronisation inside forward and backward (``.item()``, shapes that depend on values): the capture fails
  with torch's error, wrapped in one that says so;
* the same model: the graph holds the addresses of the tensors it was captured with. Each call checks that the
  trainable parameters are the same tensors, still trainable, and that ``model.training`` is unchanged, and raises
  otherwise. Switching adapters, adding modules or changing a layer's train/eval mode needs a new step object.

With transformers' SDPA attention, some transformers releases (5.17) build an explicit causal mask during the
capture where eager runs let SDPA apply causality itself (slower attention kernels in the graph); 5.24 does not.
``lorakit.integrations.causal_sdpa.use_causal_sdpa(model)`` keeps ``is_causal`` on any release.

Dropout draws fresh random numbers on every replay (torch registers the default CUDA generator with the graph).
``accumulate_grad=False`` (the default) makes each call's gradients those of its batch alone, like ``zero_grad`` +
``backward``; ``True`` adds them onto ``.grad`` (gradient accumulation; a gradient set to None counts as zero).
On any device other than CUDA the step runs eagerly with the same interface and semantics. Multi-process runs
(DDP, FSDP) are refused: their synchronisation is host work in every step, which a replay skips.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def output_loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a transformers model returns when the batch has labels (``outputs.loss``, ``outputs["loss"]`` or a
    tuple's first entry)."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, tuple) and outputs and torch.is_tensor(outputs[0]):
        loss = outputs[0]
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise ValueError(
            f"The model's output ({type(outputs).__name__}) has no scalar loss; put the labels in the batch "
            "(batch keys: " + ", ".join(sorted(batch)) + ") or pass loss_fn=(outputs, batch) -> loss."
        )
    return loss


def _static_copy(value: Any) -> Any:
    """A tensor the graph owns (a leaf again when the example required grad); other values are kept as constants."""
    if not torch.is_tensor(value):
        return value
    return value.detach().clone().requires_grad_(value.requires_grad)


def _refuse_distributed(model: nn.Module) -> None:
    """DDP and FSDP run host-side logic in every step (bucketing and all-reduce launches, gathering and freeing
    shards) that a replay would skip: gradients would silently stop being synchronised. Refused, by name."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"CudaGraphStep replays one process's kernels; with {dist.get_world_size()} processes, DDP's or FSDP's "
            f"per-step synchronisation of {type(model).__name__} would be skipped by the replay. Train eagerly there "
            "(docs/distributed.md)."
        )


class CudaGraphStep:
    """Forward + backward of ``model(**batch)``'s loss, captured as one CUDA graph (eager off CUDA)."""

    def __init__(
        self,
        model: nn.Module,
        example_batch: Mapping[str, Any],
        *,
        loss_fn: LossFn = output_loss,
        accumulate_grad: bool = False,
        warmup_steps: int = 3,
    ) -> None:
        """Run ``warmup_steps`` eager steps on a side stream (kernels tuned, lazy state built), then capture one
        (off CUDA: one eager step, which checks the model and the loss).

        Args:
            model: called as ``model(**batch)``; its parameters with ``requires_grad`` get gradients
            example_batch: name -> tensor (or constant) with the shapes every later batch must have
            loss_fn: (outputs, batch) -> scalar loss; default: the model's own loss (labels in the batch)
            accumulate_grad: add each call's gradients onto ``.grad`` instead of replacing them
            warmup_steps: eager steps before the capture (at least 1: cuBLAS and autograd set up outside it)
        """
        _refuse_distributed(model)
        self.model = model
        self.loss_fn = loss_fn
        self.accumulate_grad = accumulate_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not example_batch:
            raise ValueError("example_batch is empty; pass the model's inputs as a dict, e.g. input_ids and labels.")
        self.batch = {key: _static_copy(value) for key, value in example_batch.items()}
        if not self.params and not self._input_leaves():
            raise ValueError(
                f"{type(model).__name__} has no parameter with requires_grad=True and no batch entry requires grad: "
                "nothing for backward to compute."
            )
        self._pointers = [p.data_ptr() for p in self.params]
        self._training = model.training
        self.graph: torch.cuda.CUDAGraph | None = None
        self.grads: list[torch.Tensor | None] = []
        self.loss: torch.Tensor | None = None
        if next(iter(self.params + self._input_leaves())).is_cuda:
            self._capture(max(1, warmup_steps))
        else:  # one eager step checks the model and loss now, as the warm-up does on CUDA
            self._forward_backward()
            for tensor in self.params + self._input_leaves():
                tensor.grad = None

    # ------------------------------------------------------------------ capture
    def _forward_backward(self) -> torch.Tensor:
        loss = self.loss_fn(self.model(**self.batch), self.batch)
        loss.backward()
        return loss.detach()

    def _input_leaves(self) -> list[torch.Tensor]:
        return [v for v in self.batch.values() if torch.is_tensor(v) and v.requires_grad]

    def _capture(self, warmup_steps: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        # accumulate: backward adds in place into zeros made outside the graph; else it leaves fresh gradients in
        # the graph's memory, rewritten at the same addresses by every replay (the inputs' gradients: always fresh)
        for param in self.params:
            param.grad = torch.zeros_like(param) if self.accumulate_grad else None
        for leaf in self._input_leaves():
            leaf.grad = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss = self._forward_backward()
        except RuntimeError as error:
            self.graph = None
            raise RuntimeError(
                f"Capturing the training step of {type(self.model).__name__} as a CUDA graph failed: something in "
                "its forward or backward waits for the host (.item(), .tolist(), a shape that depends on values, "
                "printing a tensor) or allocates outside the graph. Run it eagerly, or remove the synchronisation. "
                f"torch said: {error}"
            ) from error
        self.grads = [p.grad for p in self.params]

    # ------------------------------------------------------------------ calls
    def _load(self, batch: Mapping[str, Any]) -> None:
        """Copy ``batch`` into the graph's input tensors (same keys, shapes and dtypes as the example)."""
        if batch.keys() != self.batch.keys():
            missing, extra = sorted(self.batch.keys() - batch.keys()), sorted(batch.keys() - self.batch.keys())
            raise ValueError(
                f"The batch's keys differ from the example batch's: missing {missing}, unexpected {extra}; "
                f"a CUDA-graph step takes exactly {sorted(self.batch)}."
            )
        for key, value in batch.items():
            static = self.batch[key]
            if not torch.is_tensor(static):
                if value is not static and value != static:
                    raise ValueError(f"Batch entry {key!r} is {value!r}; the step was captured with {static!r}.")
                continue
            if not torch.is_tensor(value) or value.shape != static.shape or value.dtype != static.dtype:
                got = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"Batch entry {key!r} is {got}; the step was captured with {tuple(static.shape)} {static.dtype}. "
                    "A graph replays fixed shapes: pad batches to the example's shape or build a step per shape."
                )
            with torch.no_grad():
                static.copy_(value, non_blocking=True)

    def _check_unchanged(self) -> None:
        if self.model.training != self._training:
            mode = "train" if self._training else "eval"
            raise RuntimeError(f"The step was captured in {mode} mode; switch the model back or build a new step.")
        for index, (param, pointer) in enumerate(zip(self.params, self._pointers)):
            if not param.requires_grad or param.data_ptr() != pointer:
                raise RuntimeError(
                    f"Trainable parameter {index} ({tuple(param.shape)}) was frozen, moved or replaced since the "
                    "step was captured; the graph would still use the old tensor. Build a new CudaGraphStep."
                )

    def _attach_grads(self) -> None:
        """Put the graph's gradient tensors back on ``.grad`` (``zero_grad(set_to_none=True)`` drops them)."""
        for param, grad in zip(self.params, self.grads):
            current = param.grad
            if current is grad or grad is None:
                continue
            if self.accumulate_grad:  # the graph adds onto ``grad``: start from what .grad holds now
                grad.zero_() if current is None else grad.copy_(current)
            param.grad = grad

    def __call__(self, batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Forward and backward on ``batch`` (None: the tensors already loaded); returns the loss (detached)."""
        if batch is not None:
            self._load(batch)
        self._check_unchanged()
        if self.graph is None:
            for leaf in self._input_leaves():
                leaf.grad = None
            if not self.accumulate_grad:
                for param in self.params:
                    param.grad = None
            return self._forward_backward()
        self._attach_grads()
        self.graph.replay()
        return self.loss.clone()

    def input_grad(self, key: str) -> torch.Tensor | None:
        """The gradient of batch entry ``key`` (an example tensor that required grad), from the last call."""
        if key not in self.batch:
            raise KeyError(f"No batch entry {key!r}; the step's entries are {sorted(self.batch)}.")
        value = self.batch[key]
        return value.grad if torch.is_tensor(value) else None
