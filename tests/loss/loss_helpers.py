"""Run a LoRA model's training step with and without the fused loss and compare loss and gradients."""

from __future__ import annotations

import torch

REL = 1e-5  # float32, relative to each reference tensor's norm


def step(model, fused: bool, **inputs):
    """(output, {trainable parameter name: grad}) of one forward + backward, from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    if fused:
        model.enable_fused_loss(chunk_size=inputs.pop("chunk_size", 5))
    else:
        inputs.pop("chunk_size", None)
        model.disable_fused_loss()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.disable_fused_loss()
    return out, grads


def assert_same_step(model, **inputs) -> tuple:
    """The fused step's loss and every gradient equal the ordinary step's (REL); returns both outputs."""
    ref, ref_grads = step(model, False, **inputs)
    out, grads = step(model, True, **inputs)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=REL, atol=0)
    assert grads.keys() == ref_grads.keys() and grads, sorted(set(grads) ^ set(ref_grads))
    for name, g in ref_grads.items():
        err = ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err <= REL, f"{name}: relative gradient error {err:.2e}"
    return out, ref


def batch(vocab: int, rows: int = 2, length: int = 12, seed: int = 1, masked: int = 3) -> dict:
    """input_ids and labels (the first ``masked`` labels of row 0 are -100, as a prompt mask would make them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :masked] = -100
    return {"input_ids": ids, "labels": labels}
