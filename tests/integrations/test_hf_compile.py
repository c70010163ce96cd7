"""torch.compile of a single-adapter lorakit model: one graph (no graph break in any LoRA layer), eager outputs.

A counting backend that runs the captured graph eagerly: graph capture by dynamo is under test, not code generation.
``fullgraph=True`` turns any graph break into an error that names its reason."""

from __future__ import annotations

import pytest
import torch

import lorakit
from compile_helpers import CountingBackend
from models import MLP, tiny_llama

CASES = {
    "mlp": (
        lambda: (torch.manual_seed(0), MLP())[1].eval(),
        dict(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False),
        lambda: {"x": torch.randn(3, 10, generator=torch.Generator().manual_seed(0))},
    ),
    "llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, init_lora_weights=False),
        lambda: {"input_ids": torch.arange(1, 13).reshape(2, 6), "use_cache": False},
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_compiled_lora_model_has_no_graph_break_and_matches_eager(kind):
    build, config, inputs = CASES[kind]
    model = lorakit.get_peft_model(build(), lorakit.LoraConfig(**config)).eval()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        expected = model(**inputs())
        got = compiled(**inputs())
    expected = expected.logits if hasattr(expected, "logits") else expected
    got = got.logits if hasattr(got, "logits") else got
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert backend.graphs == 1
    torch._dynamo.reset()


def test_compiled_model_sees_a_mixed_batch_routing():
    """dynamo guards on the routing global: a compiled model must not reuse its single-adapter graph for a mixed
    batch (a stale graph would silently give every row the active adapter)."""
    model = lorakit.get_peft_model(
        (torch.manual_seed(0), MLP())[1].eval(),
        lorakit.LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False),
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False))
    model.eval()
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=CountingBackend())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
        expected = model(x, adapter_names=names)
        torch.testing.assert_close(compiled(x, adapter_names=names), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, model(x))
    torch._dynamo.reset()
