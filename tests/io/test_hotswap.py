"""Hotswapping (lorakit.utils.hotswap): in-place swaps equal a fresh load, compiled models do not recompile,
bad swaps fail clearly, and the result matches peft's hotswap on the same adapters."""

from __future__ import annotations

import pytest
import torch

from compile_helpers import CountingBackend
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from models import BUILDERS, make_inputs, output_tensor

MLP_TARGETS = ["lin0", "lin1"]


def _save(tmp_path, name: str, kind: str = "mlp", seed: int = 0, **kwargs) -> str:
    """Save an adapter with random (non-zero) factors; returns its folder."""
    config = LoraConfig(init_lora_weights=False, **kwargs)
    torch.manual_seed(100 + seed)
    model = get_peft_model(BUILDERS[kind](), config)
    folder = str(tmp_path / name)
    model.save_pretrained(folder)
    return folder


def _out(model, kind: str = "mlp") -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**make_inputs(kind)))


def _fresh(folder: str, kind: str = "mlp") -> torch.Tensor:
    return _out(PeftModel.from_pretrained(BUILDERS[kind](), folder), kind)


@pytest.fixture
def adapters(tmp_path):
    """Three MLP adapters on the same targets with different ranks and alphas (and a rank_pattern)."""
    return {
        "a": _save(tmp_path, "a", target_modules=MLP_TARGETS, r=4, lora_alpha=8, seed=0),
        "b": _save(tmp_path, "b", target_modules=MLP_TARGETS, r=8, lora_alpha=3, seed=1),
        "c": _save(tmp_path, "c", target_modules=MLP_TARGETS, r=2, lora_alpha=16, rank_pattern={"lin1": 6}, seed=2),
    }


@pytest.mark.parametrize("pair", [("a", "b"), ("b", "a"), ("a", "c")])
def test_hotswap_equals_fresh_load_unprepared(adapters, pair):
    """Without preparation ranks may shrink (zero-padded) or grow (parameters replaced); output = fresh load."""
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters[pair[0]])
    before = model.base_model.model.lin0.lora_A["default"].weight
    hotswap_adapter(model, adapters[pair[1]], adapter_name="default")
    assert model.base_model.model.lin0.lora_A["default"].weight is before  # same parameter object
    torch.testing.assert_close(_out(model), _fresh(adapters[pair[1]]), atol=1e-5, rtol=1e-5)


def test_hotswap_llama_with_patterns(tmp_path):
    kw = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    first = _save(tmp_path, "l0", "llama", 0, r=4, lora_alpha=8, **kw)
    second = _save(tmp_path, "l1", "llama", 1, r=4, lora_alpha=5, rank_pattern={"v_proj": 2}, **kw)
    model = PeftModel.from_pretrained(BUILDERS["llama"](), first)
    hotswap_adapter(model, second, adapter_name="default")
    torch.testing.assert_close(_out(model, "llama"), _fresh(second, "llama"), atol=1e-5, rtol=1e-5)
    assert model.base_model.model.model.layers[0].self_attn.v_proj.r["default"] == 2


def test_prepared_compiled_hotswap_does_not_recompile(adapters):
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    reference = _out(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (8, 10)
    assert isinstance(model.base_model.model.lin0.scaling["default"], torch.Tensor)
    torch.testing.assert_close(_out(model), reference, atol=1e-6, rtol=1e-6)  # padding leaves the output as it was

    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(_out(compiled), reference, atol=1e-5, rtol=1e-5)
    for name in ("b", "c", "a"):
        hotswap_adapter(compiled, adapters[name], adapter_name="default")
        torch.testing.assert_close(_out(compiled), _fresh(adapters[name]), atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1, f"recompiled: {backend.graphs} graphs"
    torch._dynamo.reset()


def test_unprepared_alpha_change_recompiles(adapters):
    """The control for the test above: a float scaling is baked into the graph, so a new alpha recompiles."""
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["b"])
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    _out(compiled)
    hotswap_adapter(compiled, adapters["a"], adapter_name="default")  # r 4 < 8 fits, scaling 2 != 3/8
    torch.testing.assert_close(_out(compiled), _fresh(adapters["a"]), atol=1e-5, rtol=1e-5)
    assert backend.graphs == 2
    torch._dynamo.reset()


def test_tensor_scaling_on_fast_path_train_and_set_scale(adapters):
    """A pinned scaling goes through the fused kernels (forward and backward) like the float one."""
    plain = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"], is_trainable=True)
    pinned = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"], is_trainable=True)
    prepare_model_for_compiled_hotswap(pinned, target_rank=6)
    x = make_inputs("mlp")["x"]
    for m in (plain, pinned):
        m.base_model.model.lin0.set_scale("default", 0.5)
        m(x).square().sum().backward()
    torch.testing.assert_close(pinned(x), plain(x), atol=1e-6, rtol=1e-6)
    g_plain = plain.base_model.model.lin0.lora_B["default"].weight.grad
    g_pinned = pinned.base_model.model.lin0.lora_B["default"].weight.grad
    torch.testing.assert_close(g_pinned[:, :4], g_plain, atol=1e-6, rtol=1e-6)
    assert float(pinned.base_model.model.lin0.scaling["default"]) == pytest.approx(0.5 * 8 / 4)


def test_hotswap_errors(tmp_path, adapters):
    other_targets = _save(tmp_path, "t", target_modules=["lin0", "lin1", "head"], r=4, lora_alpha=8)
    rslora = _save(tmp_path, "rs", target_modules=MLP_TARGETS, r=4, lora_alpha=8, use_rslora=True)
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    with pytest.raises(ValueError, match=r"targets modules the loaded one does not.*head.*targets: .*lin0"):
        hotswap_adapter(model, other_targets, adapter_name="default")
    with pytest.raises(ValueError, match=r"'other'.*loaded: \['default'\]"):
        hotswap_adapter(model, adapters["b"], adapter_name="other")
    with pytest.raises(ValueError, match="use_rslora"):
        hotswap_adapter(model, rslora, adapter_name="default")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, adapters["b"], adapter_name="default")
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model), _fresh(adapters["a"]), atol=1e-5, rtol=1e-5)  # failed swaps: untouched

    prepare_model_for_compiled_hotswap(model, target_rank=6)
    with pytest.raises(ValueError, match=r"rank 8, larger than the 6 .*target_rank >= "):
        hotswap_adapter(model, adapters["b"], adapter_name="default")
    with pytest.raises(ValueError, match=r"target_rank=2: its rank is already 6"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match=r"\*before\* compiling"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"))
    with pytest.raises(ValueError, match="check_compiled must be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="loud")
    with pytest.raises(ValueError, match="No LoRA adapter layers"):
        prepare_model_for_compiled_hotswap(BUILDERS["mlp"]())


def test_prepare_updates_config(adapters):
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["c"])
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert model.peft_config["default"].r == 8
    assert model.peft_config["default"].rank_pattern == {"lin1": 8}


def test_parity_with_peft_hotswap(tmp_path, adapters):
    """peft's prepare + hotswap and ours on the same saved adapters give the same outputs and padded factors.

    Not adapter "c": peft 0.21's hotswap matches rank_pattern against parameter keys (``...lora_A.default.weight``)
    so the pattern never applies and lin1 gets alpha / r instead of alpha / 6; ours equals a fresh load there
    (test_prepared_compiled_hotswap_does_not_recompile)."""
    adapters = {**adapters, "d": _save(tmp_path, "d", target_modules=MLP_TARGETS, r=2, lora_alpha=16, seed=3)}
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    theirs = peft.PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    ours = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    peft_prepare(theirs, target_rank=8)
    prepare_model_for_compiled_hotswap(ours, target_rank=8)
    for name in ("b", "d", "a"):
        peft_hotswap(theirs, adapters[name], adapter_name="default", torch_device="cpu")
        hotswap_adapter(ours, adapters[name], adapter_name="default")
        torch.testing.assert_close(_out(ours), _out(theirs), atol=1e-6, rtol=1e-6)
        for key, value in theirs.state_dict().items():
            if ".lora_" in key:
                torch.testing.assert_close(ours.state_dict()[key], value)


@pytest.mark.parametrize(
    "kind, targets",
    [("emb", ["emb", "lin"]), ("conv", ["conv1d", "conv2d", "conv3d"])],
)
def test_prepared_compiled_hotswap_embedding_and_conv(tmp_path, kind, targets):
    """Embedding factors (ParameterDict) and conv factors (kernel-shaped A, 1x1 B) pad and swap alike."""
    first = _save(tmp_path, "x0", kind, 0, target_modules=targets, r=2, lora_alpha=7)
    second = _save(tmp_path, "x1", kind, 1, target_modules=targets, r=6, lora_alpha=3)
    model = PeftModel.from_pretrained(BUILDERS[kind](), first)
    reference = _out(model, kind)
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(_out(compiled, kind), reference, atol=1e-5, rtol=1e-5)
    hotswap_adapter(compiled, second, adapter_name="default")
    torch.testing.assert_close(_out(compiled, kind), _fresh(second, kind), atol=1e-5, rtol=1e-5)
    hotswap_adapter(compiled, first, adapter_name="default")
    torch.testing.assert_close(_out(compiled, kind), reference, atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1
    torch._dynamo.reset()


def test_grouped_conv_padding_is_refused(tmp_path):
    folder = _save(tmp_path, "g", "conv", target_modules=["grouped"], r=2, lora_alpha=4)
    model = PeftModel.from_pretrained(BUILDERS["conv"](), folder)
    with pytest.raises(NotImplementedError, match=r"grouped conv \S*grouped \(groups=2\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    prepare_model_for_compiled_hotswap(model)  # scalings only: fine on grouped convs
    assert isinstance(model.base_model.model.grouped.scaling["default"], torch.Tensor)


def test_prepared_model_mixed_batch_and_dora(tmp_path, adapters):
    """Padded factors and pinned scalings work in mixed-adapter batches (the stacked path) and with DoRA."""
    plain = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    plain.load_adapter(adapters["c"], adapter_name="other")
    padded = PeftModel.from_pretrained(BUILDERS["mlp"](), adapters["a"])
    padded.load_adapter(adapters["c"], adapter_name="other")
    prepare_model_for_compiled_hotswap(padded, target_rank=8)
    x = make_inputs("mlp")["x"]
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        torch.testing.assert_close(padded(x, adapter_names=names), plain(x, adapter_names=names))

    dora = [
        _save(tmp_path, f"dora{i}", target_modules=MLP_TARGETS, r=r, lora_alpha=a, use_dora=True, seed=i)
        for i, (r, a) in enumerate([(4, 8), (8, 3)])
    ]
    model = PeftModel.from_pretrained(BUILDERS["mlp"](), dora[0])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, dora[1], adapter_name="default")
    torch.testing.assert_close(_out(model), _fresh(dora[1]), atol=1e-5, rtol=1e-5)
