"""The contract every (model, config) pair must keep, over a table of tiny models built with fixed seeds.

Injected layers, trainable-parameter counts (from the layer shapes, independently of lorakit), scaling per layer,
outputs unchanged at default init, and a few training steps that change the loss and only the adapter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit.layers import Conv, Embedding, Linear
from models import BUILDERS, make_inputs, output_tensor


def _layer_paths(prefix: str, layers: range, names: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{n}" for i in layers for n in names}


# (id, model kind, config kwargs, expected wrapped paths -> LoRA layer class)
CASES = [
    (
        "llama_qv",
        "llama",
        dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        dict.fromkeys(_layer_paths("model.layers", range(2), ["self_attn.q_proj", "self_attn.v_proj"]), Linear),
    ),
    (
        "llama_all_linear_embed",
        "llama",
        dict(target_modules=["embed_tokens", "o_proj", "gate_proj", "up_proj", "down_proj"], r=2, lora_alpha=6),
        {
            "model.embed_tokens": Embedding,
            **dict.fromkeys(
                _layer_paths("model.layers", range(2), ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]), Linear
            ),
            **dict.fromkeys(_layer_paths("model.layers", range(2), ["mlp.down_proj"]), Linear),
        },
    ),
    (
        "gpt2_conv1d_all_linear",
        "gpt2",
        dict(target_modules="all-linear", r=4, lora_alpha=4),
        dict.fromkeys(
            _layer_paths("transformer.h", range(2), ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]), Linear
        ),
    ),
    (
        "bert_seq_cls",
        "bert",
        dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=16),
        dict.fromkeys(
            _layer_paths("bert.encoder.layer", range(2), ["attention.self.query", "attention.self.value"]), Linear
        ),
    ),
    ("mlp", "mlp", dict(target_modules=["lin0", "lin1"], r=3, lora_alpha=5), {"lin0": Linear, "lin1": Linear}),
    (
        "conv",
        "conv",
        dict(target_modules=["conv1d", "conv2d", "grouped", "conv3d"], r=4, lora_alpha=2),
        dict.fromkeys(["conv1d", "conv2d", "grouped", "conv3d"], Conv),
    ),
    ("embedding", "emb", dict(target_modules=["emb", "lin"], r=2), {"emb": Embedding, "lin": Linear}),
]
IDS = [c[0] for c in CASES]


def _expected_trainable(model: nn.Module, wrapped: dict[str, type], r: int, heads: list[str]) -> int:
    """LoRA parameter count from the base layers' shapes alone, plus full copies of the saved heads."""
    total = 0
    for path in wrapped:
        base = model.get_submodule(path)
        if isinstance(base, nn.Embedding):
            total += r * (base.num_embeddings + base.embedding_dim)
        elif isinstance(base, nn.modules.conv._ConvNd):
            total += r * base.in_channels * math.prod(base.kernel_size) + base.out_channels * r // base.groups
        else:
            out_f, in_f = base.weight.shape if isinstance(base, nn.Linear) else base.weight.shape[::-1]
            total += r * (in_f + out_f)
    return total + sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())


@pytest.mark.parametrize(("kind", "kwargs", "wrapped"), [c[1:] for c in CASES], ids=IDS)
def test_injection_counts_scaling_and_noop_init(kind, kwargs, wrapped):
    inputs = make_inputs(kind)
    base_model = BUILDERS[kind]()
    with torch.no_grad():
        base_out = output_tensor(base_model(**inputs)).clone()
    heads = ["classifier"] if kwargs.get("task_type") == "SEQ_CLS" else []
    expected_trainable = _expected_trainable(base_model, wrapped, kwargs["r"], heads)
    n_base = sum(p.numel() for p in base_model.parameters())

    model = lorakit.get_peft_model(base_model, lorakit.LoraConfig(**kwargs))
    layers = dict(model.base_model.lora_layers())
    assert {n: type(m) for n, m in layers.items()} == wrapped
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable
    assert total == n_base + expected_trainable
    alpha, r = kwargs.get("lora_alpha", 8), kwargs["r"]
    for layer in layers.values():
        assert layer.r == {"default": r}
        assert layer.scaling["default"] == pytest.approx(alpha / r)
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name or ".modules_to_save.default." in name
        assert param.requires_grad == is_adapter, name
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**inputs)), base_out, atol=0, rtol=0)


def _loss(kind: str, out: torch.Tensor, inputs: dict) -> torch.Tensor:
    if kind in ("llama", "gpt2"):
        ids = inputs["input_ids"]
        return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    return (out.float() ** 2).mean() + out.float().mean()


@pytest.mark.parametrize(("kind", "kwargs", "wrapped"), [c[1:] for c in CASES], ids=IDS)
def test_training_steps_change_loss_and_only_the_adapter(kind, kwargs, wrapped):
    model = lorakit.get_peft_model(BUILDERS[kind](), lorakit.LoraConfig(**kwargs))
    model.train()
    inputs = make_inputs(kind)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = _loss(kind, output_tensor(model(**inputs)), inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen parameter {name} changed"
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n or "lora_embedding_A" in n for n in moved)


# ---------------------------------------------------------------------------------------------- scaling
def _scalings(model) -> dict[str, tuple[int, float, float]]:
    return {
        n: (m.r["default"], m.lora_alpha["default"], m.scaling["default"]) for n, m in model.base_model.lora_layers()
    }


def test_rslora_scaling_is_alpha_over_sqrt_r():
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](),
        lorakit.LoraConfig(
            target_modules=["lin0", "lin1"], r=16, lora_alpha=8, use_rslora=True, rank_pattern={"lin1": 4}
        ),
    )
    got = _scalings(model)
    assert got["lin0"] == (16, 8, pytest.approx(8 / 4))
    assert got["lin1"] == (4, 8, pytest.approx(8 / 2))


def test_rank_and_alpha_patterns_set_each_layer_and_touch_no_other():
    config = lorakit.LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        r=8,
        lora_alpha=16,
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4, "v_proj": 6},
        alpha_pattern={"k_proj": 3},
    )
    got = _scalings(lorakit.get_peft_model(BUILDERS["llama"](), config))
    for i in range(2):
        prefix = f"model.layers.{i}.self_attn."
        assert got[prefix + "q_proj"] == (2 if i == 0 else 4, 16, pytest.approx(16 / (2 if i == 0 else 4)))
        assert got[prefix + "k_proj"] == (8, 3, pytest.approx(3 / 8))
        assert got[prefix + "v_proj"] == (6, 16, pytest.approx(16 / 6))
        assert got[prefix + "o_proj"] == (8, 16, pytest.approx(2.0))
    q0 = dict(lorakit.get_peft_model(BUILDERS["llama"](), config).base_model.lora_layers())[
        "model.layers.0.self_attn.q_proj"
    ]
    assert q0.lora_A["default"].weight.shape == (2, 32) and q0.lora_B["default"].weight.shape == (32, 2)


# ---------------------------------------------------------------------------------------------- initialisation
class Wide(nn.Module):
    """Big enough layers for distribution checks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(256, 192)
        self.conv = nn.Conv2d(16, 32, 3)
        self.emb = nn.Embedding(300, 64)


def _wrapped(init, r: int = 32) -> dict[str, lorakit.LoraLayer]:
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["lin", "conv", "emb"], r=r, init_lora_weights=init)
    return dict(lorakit.get_peft_model(Wide(), config).base_model.lora_layers())


def _assert_kaiming_uniform(a: torch.Tensor, fan_in: int) -> None:
    bound = 1 / math.sqrt(fan_in)
    a = a.detach().flatten()
    assert a.abs().max() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert (a.abs() < bound / 2).float().mean().item() == pytest.approx(0.5, abs=0.03)  # uniform, not normal


def test_default_init_kaiming_a_zero_b_and_embedding_zero_a_normal_b():
    layers = _wrapped(True)
    _assert_kaiming_uniform(layers["lin"].lora_A["default"].weight, 256)
    _assert_kaiming_uniform(layers["conv"].lora_A["default"].weight, 16 * 9)
    assert not layers["lin"].lora_B["default"].weight.any()
    assert not layers["conv"].lora_B["default"].weight.any()
    emb_a, emb_b = layers["emb"].lora_embedding_A["default"], layers["emb"].lora_embedding_B["default"]
    assert not emb_a.any()
    assert emb_b.mean().item() == pytest.approx(0.0, abs=0.05)
    assert emb_b.std().item() == pytest.approx(1.0, rel=0.05)


def test_gaussian_init_a_std_one_over_r():
    for r in (8, 32):
        layers = _wrapped("gaussian", r)
        for name in ("lin", "conv"):
            a = layers[name].lora_A["default"].weight
            assert a.std().item() == pytest.approx(1 / r, rel=0.08)
            assert a.mean().item() == pytest.approx(0.0, abs=0.1 / r)
            assert not layers[name].lora_B["default"].weight.any()
        assert not layers["emb"].lora_embedding_A["default"].any()


def test_init_false_gives_nonzero_b_and_changes_outputs():
    layers = _wrapped(False)
    for name in ("lin", "conv"):
        assert layers[name].lora_B["default"].weight.abs().min() > 0
    assert layers["emb"].lora_embedding_A["default"].abs().min() > 0
    model = lorakit.get_peft_model(
        BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=False)
    )
    x = make_inputs("mlp")["x"]
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
    with torch.no_grad():
        assert not torch.allclose(model(x), base)


def test_lora_bias_starts_at_zero_so_init_is_a_noop():
    model = BUILDERS["conv"]()
    inputs = make_inputs("conv")
    with torch.no_grad():
        base = model(**inputs)
    config = lorakit.LoraConfig(target_modules=["conv1d", "conv2d", "head"], lora_bias=True, r=2)
    model = lorakit.get_peft_model(model, config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), base, atol=0, rtol=0)
    bias = model.base_model.model.head.lora_B["default"].bias
    assert bias is not None and bias.requires_grad and not bias.any()


# ---------------------------------------------------------------------------------------------- dtypes and dropout
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_on_bf16_base(autocast):
    model = BUILDERS["llama"]().to(torch.bfloat16)
    config = lorakit.LoraConfig(target_modules=["embed_tokens", "q_proj", "down_proj"], r=4, init_lora_weights=False)
    model = lorakit.get_peft_model(model, config, autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora and set(lora.values()) == {want}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    with torch.no_grad():
        assert model(**make_inputs("llama")).logits.dtype == torch.bfloat16


def test_dropout_is_active_in_train_and_off_in_eval():
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], lora_dropout=0.5, init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    x = make_inputs("mlp")["x"]
    layer = model.base_model.model.lin0
    assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.lora_dropout["default"].p == 0.5
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        first = model(x)
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        for name in ("lin0", "lin1"):
            getattr(model.base_model.model, name).lora_dropout["default"] = nn.Identity()
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)


def test_embedding_ignores_dropout_as_peft():
    config = lorakit.LoraConfig(target_modules=["emb"], lora_dropout=0.9, init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["emb"](), config).train()
    ids = make_inputs("emb")["ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids), atol=0, rtol=0)
