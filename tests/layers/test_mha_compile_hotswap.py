"""LoRA on nn.MultiheadAttention under torch.compile and hotswapping: one graph without breaks, eager outputs, and
swapped adapters equal to a fresh load (also compiled after ``prepare_model_for_compiled_hotswap``, no recompile)."""

from __future__ import annotations

import torch
from test_mha_layer import Attn, _x

import lorakit
from compile_helpers import CountingBackend
from lorakit.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap


def _model(seed: int, r: int = 2, alpha: int = 4):
    torch.manual_seed(0)
    base = Attn()
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(target_modules=["mha", "lin"], r=r, lora_alpha=alpha, init_lora_weights=False)
    return lorakit.get_peft_model(base, config).eval()


def _saved(tmp_path, name: str, seed: int, **kwargs) -> str:
    folder = str(tmp_path / name)
    _model(seed, **kwargs).save_pretrained(folder)
    return folder


def _fresh(folder: str) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return lorakit.PeftModel.from_pretrained(Attn(), folder).eval()(_x())


def test_compiled_mha_model_is_one_graph_with_eager_outputs():
    model = _model(1)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # a graph break raises
    with torch.no_grad():
        expected, got = model(_x()), compiled(_x())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert backend.graphs == 1
    torch._dynamo.reset()


def test_hotswap_into_mha_equals_a_fresh_load(tmp_path):
    other = _saved(tmp_path, "other", seed=2)
    model = _model(1)
    with torch.no_grad():
        before = model(_x())
    hotswap_adapter(model, other, adapter_name="default")
    with torch.no_grad():
        after = model(_x())
    assert (after - before).abs().max() > 1e-3  # the swap changed the adapter
    torch.testing.assert_close(after, _fresh(other), atol=1e-6, rtol=1e-6)


def test_prepared_compiled_mha_hotswaps_ranks_and_alphas_without_recompiling(tmp_path):
    small = _saved(tmp_path, "small", seed=2, r=2, alpha=4)
    large = _saved(tmp_path, "large", seed=3, r=4, alpha=3)
    model = _model(1, r=2, alpha=4)
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(_x())
        for folder in (large, small):
            hotswap_adapter(compiled, folder, adapter_name="default")
            torch.testing.assert_close(compiled(_x()), _fresh(folder), atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1, f"recompiled: {backend.graphs} graphs"
    torch._dynamo.reset()
