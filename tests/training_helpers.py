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
