"""LoRA on nn.MultiheadAttention against peft 0.21: same wrapped modules, counts, keys, outputs, gradients, files,
merges and refusals.

PEFT 0.21 adds out_proj's delta twice (its forward and merge set the merged weight, then let the nested Linear merge
once more through ``weight.data``); its gradients follow a single delta. lorakit adds it once. So wherever outputs are
compared, peft runs with out_proj's lora_B halved: then both compute W_out + s B A (see
``test_peft_adds_out_proj_delta_twice``, which pins that behaviour of the oracle).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import lorakit
from lorakit.layers import LoraLayer

OUT_B = "mha.base_layer.out_proj.lora_B.default.weight"


class Attn(nn.Module):
    """Self-attention (embed 8, 2 heads) then a Linear."""

    def __init__(self, batch_first: bool = True, **mha_kwargs) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **mha_kwargs)
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.mha(x, x, x)[0])


def _base(batch_first: bool = True) -> Attn:
    torch.manual_seed(0)
    return Attn(batch_first)


def _x(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1)


def _config(lib, **kwargs):
    settings = {"target_modules": ["mha", "lin"], "r": 2, "lora_alpha": 4, "init_lora_weights": False} | kwargs
    return lib.LoraConfig(**settings)


def _inner(model) -> nn.Module:
    return model.base_model.model


def _halve_out_proj_b(peft_model) -> None:
    """peft adds out_proj's delta twice: with B halved it computes the same weight as lorakit with B."""
    with torch.no_grad():
        _inner(peft_model).mha.base_layer.out_proj.lora_B["default"].weight.mul_(0.5)


def _pair(batch_first: bool = True):
    """(peft model, lorakit model) on the same base, lorakit holding peft's adapter weights (B != 0), peft's out_proj
    B halved afterwards."""
    base = _base(batch_first)
    ours = lorakit.get_peft_model(copy.deepcopy(base), _config(lorakit))
    theirs = peft.get_peft_model(base, _config(peft))
    missing = _inner(ours).load_state_dict(_inner(theirs).state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    _halve_out_proj_b(theirs)
    return theirs, ours


def _lora_modules(model, kind) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in _inner(model).named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("batch_first", [True, False])
def test_wrapped_modules_count_and_printed_line_match_peft(batch_first, capsys):
    theirs, ours = _pair(batch_first)
    expected = {"mha": "MultiheadAttention", "mha.base_layer.out_proj": "Linear", "lin": "Linear"}
    assert _lora_modules(theirs, BaseTunerLayer) == expected
    assert _lora_modules(ours, LoraLayer) == expected
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (120, 444)
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    peft_line, our_line = capsys.readouterr().out.splitlines()
    assert our_line == peft_line


def test_state_dict_and_saved_keys_match_peft(tmp_path):
    theirs, ours = _pair()
    shapes = {k: tuple(v.shape) for k, v in _inner(theirs).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in _inner(ours).state_dict().items()} == shapes
    assert shapes["mha.lora_B.default.weight"] == (24, 2) and shapes[OUT_B] == (8, 2)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    saved = [load_file(tmp_path / side / "adapter_model.safetensors") for side in ("peft", "ours")]
    assert {k: v.shape for k, v in saved[1].items()} == {k: v.shape for k, v in saved[0].items()}
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in saved[1]


def _reference_output(ours, x: torch.Tensor) -> torch.Tensor:
    """torch's attention and Linear with W + s B A written into plain copies of the base modules (s = 4 / 2)."""
    model = _inner(ours)
    mha = copy.deepcopy(model.mha.get_base_layer())
    lin = model.lin
    with torch.no_grad():
        out_proj = mha.out_proj
        mha.out_proj = copy.deepcopy(out_proj.get_base_layer())
        mha.in_proj_weight += 2 * model.mha.lora_B["default"].weight @ model.mha.lora_A["default"].weight
        mha.out_proj.weight += 2 * out_proj.lora_B["default"].weight @ out_proj.lora_A["default"].weight
        h = mha(x, x, x)[0]
        return lin.base_layer(h) + 2 * lin.lora_B["default"](lin.lora_A["default"](h))


@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_is_attention_with_adapted_weights_and_equals_peft(batch_first):
    theirs, ours = _pair(batch_first)
    x = _x(batch_first)
    out = ours(x)
    torch.testing.assert_close(out, _reference_output(ours, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, _base(batch_first)(x), atol=1e-3)


def test_peft_adds_out_proj_delta_twice():
    theirs, ours = _pair()
    x = _x()
    with torch.no_grad():  # undo the halving: peft then equals lorakit with out_proj's B doubled
        _inner(theirs).mha.base_layer.out_proj.lora_B["default"].weight.mul_(2)
        _inner(ours).mha.base_layer.out_proj.lora_B["default"].weight.mul_(2)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_gradients_match_peft(batch_first):
    theirs, ours = _pair(batch_first)
    x = _x(batch_first)
    for model in (theirs, ours):
        (model(x) ** 2).sum().backward()
    grads = [{n: p.grad for n, p in _inner(m).named_parameters() if p.requires_grad} for m in (theirs, ours)]
    assert grads[0].keys() == grads[1].keys() and len(grads[1]) == 6
    for name, grad in grads[1].items():
        # peft's graph holds out_proj's delta once with its halved B: d/dB equal, d/dA half of ours (B is halved)
        factor = 2.0 if name == "mha.base_layer.out_proj.lora_A.default.weight" else 1.0
        torch.testing.assert_close(grad, factor * grads[0][name], atol=1e-5, rtol=1e-5, msg=name)
        assert grad.abs().sum() > 0, name


def test_base_weights_get_no_gradient_and_stay_registered():
    _, ours = _pair()
    ours(_x()).sum().backward()
    mha = _inner(ours).mha.get_base_layer()
    assert isinstance(mha.in_proj_weight, nn.Parameter) and mha.in_proj_weight.grad is None
    assert "in_proj_weight" in dict(mha.named_parameters())


def test_save_in_lorakit_load_in_peft_and_back(tmp_path):
    theirs, ours = _pair()
    x = _x()
    ours.save_pretrained(tmp_path / "ours")
    loaded_in_peft = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    lora_keys = [k for k in _inner(ours).state_dict() if "lora_" in k]
    for key in lora_keys:
        torch.testing.assert_close(_inner(loaded_in_peft).state_dict()[key], _inner(ours).state_dict()[key])
    _halve_out_proj_b(loaded_in_peft)
    torch.testing.assert_close(loaded_in_peft(x), ours(x), atol=1e-5, rtol=1e-5)

    theirs.save_pretrained(tmp_path / "peft")  # saved with the halved B: lorakit computes what peft computes
    loaded_in_ours = lorakit.PeftModel.from_pretrained(_base(), tmp_path / "peft")
    for key in lora_keys:
        torch.testing.assert_close(_inner(loaded_in_ours).state_dict()[key], _inner(theirs).state_dict()[key])
    with torch.no_grad():
        _inner(loaded_in_ours).mha.base_layer.out_proj.lora_B["default"].weight.mul_(2)
    torch.testing.assert_close(loaded_in_ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_delta_weight_equals_peft():
    theirs, ours = _pair()
    ours_mha, theirs_mha = _inner(ours).mha, _inner(theirs).mha
    torch.testing.assert_close(ours_mha.get_delta_weight("default"), theirs_mha.get_delta_weight("default"))
    assert ours_mha.get_delta_weight("default").shape == (24, 8)
    torch.testing.assert_close(  # peft's out_proj delta counts twice
        ours_mha.out_proj_layer.get_delta_weight("default"),
        2 * theirs_mha.base_layer.out_proj.get_delta_weight("default"),
    )


def test_merge_unmerge_round_trip():
    _, ours = _pair()
    x = _x()
    mha = _inner(ours).mha
    original = [mha.in_proj_weight.detach().clone(), mha.out_proj_layer.weight.detach().clone()]
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge_adapter()
        assert mha.merged and mha.out_proj_layer.merged
        assert not torch.allclose(mha.in_proj_weight, original[0])
        torch.testing.assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
        assert not mha.merged and not mha.out_proj_layer.merged
        torch.testing.assert_close(mha.in_proj_weight, original[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(mha.out_proj_layer.weight, original[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_merge_and_unload_equals_peft(batch_first):
    theirs, ours = _pair(batch_first)
    x = _x(batch_first)
    with torch.no_grad():
        expected = ours(x)
        merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(merged_ours.mha) is nn.MultiheadAttention
    assert type(merged_ours.mha.out_proj) is type(_base().mha.out_proj)
    assert not any(isinstance(m, LoraLayer) for m in merged_ours.modules())
    state_theirs, state_ours = merged_theirs.state_dict(), merged_ours.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_ours.items():
        torch.testing.assert_close(value, state_theirs[key], atol=1e-6, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(x), expected, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_base_model():
    _, ours = _pair()
    x = _x()
    unloaded = ours.unload()
    assert type(unloaded.mha.out_proj) is type(_base().mha.out_proj) and type(unloaded.mha) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x), _base()(x))


def test_disable_adapter_gives_the_base_output_even_when_merged():
    _, ours = _pair()
    x = _x()
    with torch.no_grad():
        base_out = _base()(x)
        adapted = ours(x)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), base_out)
        ours.merge_adapter()
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), base_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), adapted, atol=1e-5, rtol=1e-5)


def test_second_adapter_reaches_both_projections_and_set_adapter_switches():
    base = _base()
    ours = lorakit.get_peft_model(base, _config(lorakit))
    ours.add_adapter("other", _config(lorakit, r=3))
    mha = _inner(ours).mha
    assert set(mha.lora_A) == set(mha.out_proj_layer.lora_A) == {"default", "other"}
    assert mha.out_proj_layer.lora_A["other"].weight.shape == (3, 8)
    x = _x()
    with torch.no_grad():
        first = ours(x)
        ours.set_adapter("other")
        assert not torch.allclose(ours(x), first)
        assert mha.lora_A["other"].weight.requires_grad and not mha.lora_A["default"].weight.requires_grad


def test_dropout_is_not_applied_with_a_warning_as_peft():
    base = _base()
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, target_modules=["mha"], lora_dropout=0.5))
    with pytest.warns(UserWarning, match=r"lora_dropout=0.5 is not applied on MultiheadAttention 'mha'"):
        ours = lorakit.get_peft_model(base, _config(lorakit, target_modules=["mha"], lora_dropout=0.5))
    _inner(ours).load_state_dict(_inner(theirs).state_dict())
    _halve_out_proj_b(theirs)
    x = _x()
    ours.train()
    theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)  # train mode: no dropout on either


def test_refusals_match_peft():
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(_base(), _config(peft, use_dora=True))
    base = _base()
    with pytest.raises(ValueError, match=r"MultiheadAttention 'mha' does not support the dora variant"):
        lorakit.get_peft_model(base, _config(lorakit, use_dora=True))
    assert type(base.mha.out_proj) is type(_base().mha.out_proj)  # the model is left as it was

    separate = Attn(kdim=4, vdim=4)
    with pytest.raises(ValueError, match="Only same"):
        peft.get_peft_model(copy.deepcopy(separate), _config(peft))
    with pytest.raises(ValueError, match=r"one in_proj_weight .* kdim=4, vdim=4"):
        lorakit.get_peft_model(separate, _config(lorakit))

    # lora_bias: peft accepts it but never applies in_proj's bias; lorakit refuses instead of training a no-op
    with pytest.raises(ValueError, match=r"lora_bias=True is not supported on MultiheadAttention 'mha'"):
        lorakit.get_peft_model(_base(), _config(lorakit, lora_bias=True))


def test_mixed_adapter_batches_are_refused_as_in_peft():
    theirs, ours = _pair()
    theirs.add_adapter("other", _config(peft))
    ours.add_adapter("other", _config(lorakit))
    theirs.eval()
    ours.eval()
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        theirs(_x(), adapter_names=["default", "other"])
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        ours(_x(), adapter_names=["default", "other"])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=mask)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_encoder_fast_path_does_not_skip_the_adapters(with_mask):
    """In eval, TransformerEncoder(Layer) runs a fused kernel on the base weights when self_attn looks plain (peft
    0.21 silently drops its MHA adapters there); lorakit's layer steers it to the regular path while unmerged."""
    torch.manual_seed(0)
    base = Encoder().eval()
    model = lorakit.get_peft_model(copy.deepcopy(base), _config(lorakit, target_modules=["self_attn"]))
    x = _x()
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if with_mask else None
    model.train()  # training mode: the regular path; dropout is 0
    expected = model(x, mask)
    model.eval()
    with torch.no_grad():
        out = model(x, mask)
        if with_mask:
            out, expected = out[0], expected[0].detach()  # padded rows are filled differently by the fused path
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, base(x, mask)[0] if with_mask else base(x, mask), atol=1e-3)
        model.merge_adapter()  # merged: the fused path may run, on the merged weights
        assert _inner(model).enc.layers[0].self_attn._qkv_same_embed_dim
        merged = model(x, mask)
        torch.testing.assert_close(merged[0] if with_mask else merged, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["out_proj", "lin"], "all-linear"])
def test_targeting_out_proj_alone_warns_that_it_has_no_effect(targets):
    """torch never calls out_proj: peft wraps it anyway (same keys here), lorakit too, but says so."""
    theirs = peft.get_peft_model(_base(), _config(peft, target_modules=targets))
    with pytest.warns(UserWarning, match=r"'mha.out_proj' is the out_proj of nn.MultiheadAttention 'mha'"):
        ours = lorakit.get_peft_model(_base(), _config(lorakit, target_modules=targets))
    assert _inner(ours).state_dict().keys() == _inner(theirs).state_dict().keys()
    with torch.no_grad():
        _inner(ours).lin.lora_B["default"].weight.zero_()
        torch.testing.assert_close(ours(_x()), _base()(_x()))  # out_proj's adapter (B != 0) changes nothing


def test_add_weighted_adapter_equals_peft():
    theirs, ours = _pair()
    theirs.add_adapter("b", _config(peft, r=3))
    ours.add_adapter("b", _config(lorakit, r=3))
    _inner(ours).load_state_dict(_inner(theirs).state_dict())
    with torch.no_grad():  # _inner(theirs) holds the halved out_proj B of "default"; "b" is halved here
        _inner(ours).mha.base_layer.out_proj.lora_B["default"].weight.mul_(2)
        _inner(theirs).mha.base_layer.out_proj.lora_B["b"].weight.mul_(0.5)
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.4], "c", combination_type="cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # out_proj is combined through its attention layer, not a target of its own
        ours.add_weighted_adapter(["default", "b"], [0.7, 0.4], "c", combination_type="cat")
    for model in (theirs, ours):
        model.set_adapter("c")
    assert set(_inner(ours).mha.out_proj_layer.lora_A) == {"default", "b", "c"}
    torch.testing.assert_close(ours(_x()), theirs(_x()), atol=1e-5, rtol=1e-5)
