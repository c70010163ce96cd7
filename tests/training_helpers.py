"""A few SGD steps on a LoRA model, for tests that compare two ways of computing the same training."""

from __future__ import annotations

import torch


def sgd_losses(model, ids: torch.Tensor, steps: int, lr: float = 0.5) -> list[float]:
    """Losses of ``steps`` causal-LM SGD steps on ``ids`` (labels = inputs), over the trainable parameters."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def autograd_node_names(loss: torch.Tensor) -> list[str]:
    """The class names of every node in ``loss``'s autograd graph (each node once): which nodes a forward built."""
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names
