"""PiSSA, pissa_niter_K, OLoRA and orthogonal init: output unchanged at init, same split as peft, bad inputs."""

import peft
import pytest
import torch
from init_helpers import MODELS, assert_same_split, logits

import lorakit
from models import BUILDERS, make_inputs

METHODS = ["pissa", "pissa_niter_4", "olora", "orthogonal"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", METHODS)
def test_output_unchanged_at_init(kind, init):
    build, targets = MODELS[kind]
    inputs = make_inputs(kind)
    expected = logits(build(), inputs)
    model = lorakit.get_peft_model(
        build(), lorakit.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=init)
    )
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    a, b, _ = next(iter(_factors(model)))
    assert a.abs().sum() > 0 and b.abs().sum() > 0  # a real init, not the zero-B default


def _factors(model):
    for _, layer in model.base_model.lora_layers():
        a, b = layer._factors_2d("default")
        yield a, b, layer


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", METHODS)
def test_same_split_as_peft(kind, init):
    if kind == "gpt2" and init == "olora":
        pytest.skip("peft 0.21 runs OLoRA on Conv1D's stored (in, out) weight and produces unusable shapes")
    build, targets = MODELS[kind]
    kwargs = dict(target_modules=targets, r=4, lora_alpha=16, init_lora_weights=init)
    torch.manual_seed(11)  # pissa_niter and orthogonal draw from the global generator, as peft does
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**kwargs))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    assert_same_split(ours, theirs)
    if init == "orthogonal":  # B @ A = 0, so compare the factors themselves
        for key, value in theirs.state_dict().items():
            if ".lora_" in key:
                torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=0)


def test_rslora_and_rank_pattern_scaling_match_peft():
    build, targets = MODELS["llama"]
    kwargs = dict(
        target_modules=targets,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        init_lora_weights="pissa",
    )
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    assert_same_split(ours, theirs)


@pytest.mark.parametrize("init", METHODS)
@pytest.mark.parametrize(("kind", "targets"), [("conv", ["conv1d", "conv2d", "conv3d"]), ("emb", ["emb", "lin"])])
def test_conv_and_embedding_layers_keep_their_output(kind, targets, init):
    """The init runs on the 2-D view of any layer type: outputs stay the same and the adapter is non-trivial."""
    inputs = make_inputs(kind)
    expected = logits(BUILDERS[kind](), inputs)
    model = lorakit.get_peft_model(
        BUILDERS[kind](), lorakit.LoraConfig(target_modules=targets, r=2, init_lora_weights=init)
    )
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    for a, b, _ in _factors(model):
        assert a.abs().sum() > 0 and b.abs().sum() > 0


def test_pissa_takes_the_principal_components():
    """s * B @ A is the best rank-r approximation of W; the residual keeps the other singular values."""
    build, _ = MODELS["llama"]
    original = build().model.layers[0].mlp.down_proj.weight.detach().clone()
    config = lorakit.LoraConfig(target_modules=["down_proj"], r=3, lora_alpha=6, init_lora_weights="pissa")
    model = lorakit.get_peft_model(build(), config)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    u, s, vh = torch.linalg.svd(original, full_matrices=False)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(layer.get_delta_weight("default"), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[: len(s) - 3], s[3:], atol=1e-5, rtol=0)


def test_malformed_pissa_niter_is_rejected():
    with pytest.raises(ValueError, match="pissa_niter_x"):
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa_niter_x")


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_grouped_conv_is_refused_naming_the_layer(init):
    with pytest.raises(ValueError, match="grouped"):
        lorakit.get_peft_model(
            BUILDERS["conv"](), lorakit.LoraConfig(target_modules=["grouped"], r=2, init_lora_weights=init)
        )


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ValueError, match=r"even rank, got r=3 for layer 'model.layers.0.self_attn.q_proj'"):
        lorakit.get_peft_model(
            MODELS["llama"][0](), lorakit.LoraConfig(target_modules=["q_proj"], r=3, init_lora_weights="orthogonal")
        )


def test_rank_larger_than_the_weight_is_refused():
    with pytest.raises(ValueError, match=r"layer 'lin1' has a \(16, 20\) weight .* r=17"):
        lorakit.get_peft_model(
            BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin1"], r=17, init_lora_weights="pissa")
        )


def test_non_float_base_weight_is_refused():
    model = BUILDERS["mlp"]()
    model.lin1.weight = torch.nn.Parameter(model.lin1.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"'lin1' stores torch\.int8"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["lin1"], r=2, init_lora_weights="pissa"))
