"""Parity with peft (the reference oracle) on injection, targeting, scaling, parameter counts and outputs.

For every (model, config) case both libraries wrap a model built from the same seed. They must wrap the same
modules with the same ranks, alphas and scalings, have the same trainable-parameter count and state-dict keys, and
with peft's LoRA weights copied into lorakit the forward outputs agree to 1e-5 in float32.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer

import lorakit
from core_helpers import tiny_gpt2_layers
from models import BUILDERS, make_inputs, output_tensor

BUILDERS = {**BUILDERS, "gpt2_3": tiny_gpt2_layers}
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (id, model kind, LoraConfig kwargs); init_lora_weights=False everywhere so that B != 0 and outputs really depend
# on the copied LoRA weights.
CASES = [
    ("list", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    ("suffix_names", "llama", dict(target_modules=["self_attn.k_proj", "layers.1.mlp.up_proj"], r=4)),
    ("regex", "llama", dict(target_modules=r".*\.(q|o)_proj", r=2, lora_alpha=5)),
    ("regex_layer_idx", "llama", dict(target_modules=r"model\.layers\.1\..*_proj", r=3)),
    ("all_linear_llama", "llama", dict(target_modules="all-linear", r=2)),
    ("all_linear_upper", "llama", dict(target_modules="ALL-LINEAR", r=2)),
    ("all_linear_gpt2", "gpt2", dict(target_modules="all-linear", r=2)),
    ("all_linear_bert_seqcls", "bert", dict(task_type="SEQ_CLS", target_modules="all-linear", r=2)),
    ("none_llama", "llama", dict(r=4)),
    ("none_gpt2", "gpt2", dict(r=4)),
    ("none_bert_seqcls", "bert", dict(task_type="SEQ_CLS", r=4)),
    (
        "rank_alpha_pattern",
        "llama",
        dict(
            target_modules=LLAMA_ALL,
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
            alpha_pattern={"v_proj": 3, "down_proj": 16},
        ),
    ),
    (
        "pattern_first_match_wins",
        "llama",
        dict(
            target_modules=LLAMA_ALL,
            r=4,
            rank_pattern={r"layers\.0\..*": 2, "q_proj": 6, r".*_proj": 5},
            alpha_pattern={r"model\.layers\.1\.mlp\..*": 7, "up_proj": 1},
        ),
    ),
    ("pattern_full_path_key", "llama", dict(target_modules=["q_proj"], r=4, rank_pattern={"model.layers.0.q_proj": 2})),
    ("layers_int", "llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1, r=2)),
    ("layers_list", "gpt2_3", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0, 2], r=2)),
    (
        "layers_with_pattern",
        "llama",
        dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern="layers", r=2),
    ),
    (
        "layers_with_pattern_list",
        "gpt2_3",
        dict(target_modules=["c_proj"], layers_to_transform=[1, 2], layers_pattern=["h"], r=2),
    ),
    (
        "exact_path_skips_layer_filter",
        "llama",
        dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1], r=2),
    ),
    ("layers_empty_list", "llama", dict(target_modules=["k_proj"], layers_to_transform=[], r=2)),
    ("exclude_list", "llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "q_proj"], r=2)),
    ("exclude_regex", "llama", dict(target_modules=LLAMA_ALL, exclude_modules=r".*layers\.0\.mlp\..*", r=2)),
    ("modules_to_save_lm_head", "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], r=2)),
    ("modules_to_save_mlp", "mlp", dict(target_modules=["lin0", "lin1"], modules_to_save=["head"], r=2)),
    ("modules_to_save_seqcls", "bert", dict(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["pooler"])),
    ("rslora", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, use_rslora=True)),
    ("rslora_patterns", "mlp", dict(target_modules=["lin0", "lin1"], r=4, use_rslora=True, rank_pattern={"lin1": 9})),
    ("bias_all", "mlp", dict(target_modules=["lin0", "lin1"], r=2, bias="all")),
    ("bias_lora_only", "mlp", dict(target_modules=["lin0", "lin1"], r=2, bias="lora_only")),
    ("bias_lora_only_bert", "bert", dict(task_type="SEQ_CLS", target_modules=["query"], r=2, bias="lora_only")),
    ("bias_all_bert_head", "bert", dict(task_type="SEQ_CLS", target_modules=["query"], r=2, bias="all")),
    ("lora_bias", "mlp", dict(target_modules=["lin0", "lin1", "head"], r=2, lora_bias=True)),
    ("lora_bias_gpt2", "gpt2", dict(target_modules=["c_attn"], r=2, lora_bias=True)),
    ("dropout_eval", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.3)),
    ("conv_all", "conv", dict(target_modules=["conv1d", "conv2d", "grouped", "conv3d"], r=4, lora_alpha=3)),
    ("conv_regex", "conv", dict(target_modules=r"conv\dd", r=2, rank_pattern={"conv3d": 4})),
    ("embedding", "emb", dict(target_modules=["emb"], r=3, lora_alpha=6)),
    ("embedding_and_linear", "llama", dict(target_modules=["embed_tokens", "q_proj", "lm_head"], r=2)),
    ("fan_in_fan_out_conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=2)),
    ("fan_in_fan_out_forced", "gpt2", dict(target_modules=["c_fc"], fan_in_fan_out=False, r=2)),
    (
        "layer_replication",
        "llama",
        dict(target_modules=["q_proj", "down_proj"], layer_replication=[[0, 1], [0, 2], [1, 2]]),
    ),
    (
        "layer_replication_bert",
        "bert",
        dict(task_type="SEQ_CLS", target_modules=["query"], layer_replication=[[1, 2], [0, 2]]),
    ),
    ("alpha_float", "mlp", dict(target_modules=["lin0"], r=3, lora_alpha=2.5)),
]


def _build(kind: str, lib, kwargs: dict):
    config = lib.LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(BUILDERS[kind](), config)


def _layers(model, layer_type) -> dict[str, tuple]:
    """Wrapped module path -> type of base layer and, per adapter, (r, alpha, scaling, dropout p)."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, layer_type):
            per_adapter = {
                adapter: (
                    module.r[adapter],
                    module.lora_alpha[adapter],
                    pytest.approx(module.scaling[adapter], rel=1e-12),
                    getattr(module.lora_dropout[adapter], "p", 0.0),
                )
                for adapter in module.r
            }
            out[name] = (type(module.get_base_layer()).__name__, per_adapter)
    return out


def _printed(model) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue()


@pytest.mark.parametrize(("kind", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_injection_counts_keys_and_outputs(kind, kwargs):
    ours = _build(kind, lorakit, kwargs)
    ref = _build(kind, peft, kwargs)

    ours_layers, ref_layers = _layers(ours, lorakit.LoraLayer), _layers(ref, PeftLoraLayer)
    assert ours_layers, "the case must wrap something"
    assert ours_layers == ref_layers
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert _printed(ours) == _printed(ref)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.peft_config["default"].fan_in_fan_out == ref.peft_config["default"].fan_in_fan_out
    assert set(ours.peft_config["default"].modules_to_save or []) == set(
        ref.peft_config["default"].modules_to_save or []
    )

    with torch.no_grad():  # every trainable tensor (LoRA, biases, modules_to_save copies) moves away from the base
        for param in ref.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    ref.eval()
    inputs = make_inputs("gpt2" if kind == "gpt2_3" else kind)
    with torch.no_grad():
        expected = output_tensor(ref(**inputs))
        got = output_tensor(ours(**inputs))
        with ref.disable_adapter():
            base = output_tensor(ref(**inputs))
    assert not torch.allclose(expected, base, atol=1e-4), "the adapter must change the output for the test to bite"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("llama", dict(target_modules=["q_proj", "v_proj"])),
        ("gpt2", dict(target_modules="all-linear")),
        ("bert", dict(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["pooler"])),
        ("conv", dict(target_modules=["conv2d", "grouped"], r=2)),
    ],
    ids=["llama", "gpt2", "bert", "conv"],
)
def test_print_trainable_parameters_matches_peft_at_default_init(kind, kwargs):
    ours = lorakit.get_peft_model(BUILDERS[kind](), lorakit.LoraConfig(**kwargs))
    ref = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**kwargs))
    text = _printed(ours)
    assert text == _printed(ref)
    assert text.startswith("trainable params: ") and " || all params: " in text and " || trainable%: " in text


def test_config_after_injection_matches_peft():
    """The resolved target_modules (None / all-linear expanded) and fan_in_fan_out are written back like peft."""
    for kind, kwargs in [("llama", dict()), ("gpt2", dict(target_modules="all-linear")), ("gpt2", dict())]:
        ours = _build(kind, lorakit, kwargs).peft_config["default"]
        ref = _build(kind, peft, kwargs).peft_config["default"]
        assert set(ours.target_modules) == set(ref.target_modules)
        assert ours.fan_in_fan_out == ref.fan_in_fan_out


@pytest.mark.parametrize(
    "second",
    [
        dict(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=2),
        dict(target_modules="all-linear", r=4),  # embed_tokens is wrapped already but is not linear
        dict(target_modules=["lm_head", "embed_tokens"], r=3),
    ],
    ids=["list", "all_linear", "embedding_and_head"],
)
def test_second_adapter_with_different_targets_matches_peft(second):
    configs = [
        dict(target_modules=["q_proj", "embed_tokens"], r=2, init_lora_weights=False),
        dict(second, init_lora_weights=False),
    ]
    models = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(BUILDERS["llama"](), lib.LoraConfig(**configs[0]))
        model.add_adapter("second", lib.LoraConfig(**configs[1]))
        models.append(model)
    ours, ref = models
    assert _layers(ours, lorakit.LoraLayer) == _layers(ref, PeftLoraLayer)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours.load_state_dict(ref.state_dict())
    inputs = make_inputs("llama")
    for name in ("second", "default"):
        ours.set_adapter(name)
        ref.set_adapter(name)
        assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=0)
