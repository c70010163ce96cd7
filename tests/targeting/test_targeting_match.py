"""Target selection rules, each checked on names and on real tiny models (peft parity lives in test_parity_core)."""

from __future__ import annotations

import warnings

import pytest

import lorakit
from core_helpers import tiny_gpt2_layers
from lorakit import LoraConfig
from lorakit.targeting import DEFAULT_TARGET_MODULES, default_target_modules, is_target, rank_and_alpha
from lorakit.targeting.match import layer_index, matches_any
from models import BUILDERS


def _wrapped(model_or_kind, **kwargs) -> list[str]:
    model = BUILDERS[model_or_kind]() if isinstance(model_or_kind, str) else model_or_kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = lorakit.get_peft_model(model, LoraConfig(**kwargs))
    return sorted(name for name, _ in peft_model.base_model.lora_layers())


@pytest.mark.parametrize(
    ("names", "key", "expected"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], "q_proj", True),
        (["proj"], "model.layers.0.self_attn.q_proj", False),  # suffix must start at a dot
        (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["0.self_attn.q_proj"], "model.layers.10.self_attn.q_proj", False),
        (r".*\.q_proj", "model.layers.0.self_attn.q_proj", True),
        (r"q_proj", "model.layers.0.self_attn.q_proj", False),  # a regex must match the whole path
        (r".*layers\.1\..*", "model.layers.1.mlp", True),
        (None, "anything", False),
        ([], "anything", False),
    ],
)
def test_name_matching(names, key, expected):
    assert matches_any(names, key) is expected


@pytest.mark.parametrize(
    ("key", "pattern", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.12.attn.c_attn", None, 12),
        ("bert.encoder.layer.1.attention.self.query", None, 1),
        ("lin0", None, None),
        ("model.blocks.2.sub.5.lin", None, 2),  # the first numbered segment, not a nested (expert) index
        ("blocks.2.sub.5.lin", None, 5),  # as PEFT: the list needs a parent segment ("x.blocks.2.")
        ("layers.7.lin", None, None),
        ("blocks.2.sub.5.lin", "sub", 5),
        ("blocks.2.sub.5.lin", ["nope", "sub"], 5),
        ("model.layers.3.self_attn.q_proj", "h", None),
        ("layers.7.lin", "layers", 7),
    ],
)
def test_layer_index(key, pattern, expected):
    assert layer_index(key, pattern) == expected


def test_exact_path_in_the_list_skips_the_layer_filter_as_peft():
    config = LoraConfig(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    assert is_target(config, "model.layers.0.self_attn.q_proj")
    assert not is_target(config, "model.layers.0.self_attn.v_proj")
    assert is_target(config, "model.layers.1.self_attn.v_proj")


def test_is_target_combines_exclusions_and_layer_filter():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[1])
    assert is_target(config, "model.layers.1.self_attn.q_proj")
    assert not is_target(config, "model.layers.0.self_attn.q_proj")
    assert not is_target(config, "model.layers.1.self_attn.v_proj")
    assert not is_target(LoraConfig(target_modules=["head"], modules_to_save=["head"]), "head")


def test_list_suffix_and_regex_on_llama():
    assert _wrapped("llama", target_modules=["layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert _wrapped("llama", target_modules=r"model\.layers\.0\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
    ]


def test_all_linear_excludes_output_embedding_and_seq_cls_head():
    llama = _wrapped("llama", target_modules="all-linear")
    assert {n.rsplit(".", 1)[-1] for n in llama} == {f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")}
    assert len(llama) == 14
    gpt2 = _wrapped("gpt2", target_modules="all-linear")
    assert {n.split(".", 3)[-1] for n in gpt2} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert "lm_head" not in gpt2
    bert = _wrapped("bert", task_type="SEQ_CLS", target_modules="all-linear")
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    bert_no_task = _wrapped("bert", target_modules="all-linear")
    assert "classifier" in bert_no_task  # peft only drops the head when it knows the task
    assert _wrapped("mlp", target_modules="all-linear") == ["head", "lin0", "lin1"]  # not a transformers model


def test_none_uses_the_model_type_defaults():
    assert {n.rsplit(".", 1)[-1] for n in _wrapped("llama")} == {"q_proj", "v_proj"}
    assert {n.rsplit(".", 1)[-1] for n in _wrapped("gpt2")} == {"c_attn"}
    assert {n.rsplit(".", 1)[-1] for n in _wrapped("bert", task_type="SEQ_CLS")} == {"query", "value"}
    assert default_target_modules("t5") == ["q", "v"]
    for arch in ("llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "t5", "opt"):
        assert DEFAULT_TARGET_MODULES[arch]


def test_resolved_targets_are_written_back_into_the_config():
    config = LoraConfig(target_modules="all-linear")
    lorakit.get_peft_model(BUILDERS["mlp"](), config)
    assert sorted(config.target_modules) == ["head", "lin0", "lin1"]
    config = LoraConfig()
    lorakit.get_peft_model(BUILDERS["llama"](), config)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]


def test_layers_to_transform_int_list_and_pattern():
    gpt2 = tiny_gpt2_layers()
    assert _wrapped(gpt2, target_modules=["c_attn"], layers_to_transform=[0, 2]) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.2.attn.c_attn",
    ]
    assert _wrapped("llama", target_modules=["q_proj", "k_proj"], layers_to_transform=1) == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert _wrapped("llama", target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers") == [
        "model.layers.0.self_attn.q_proj"
    ]


def test_exclude_modules_list_and_regex():
    assert _wrapped("mlp", target_modules="all-linear", exclude_modules=["head"]) == ["lin0", "lin1"]
    assert _wrapped("llama", target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_modules_to_save_are_never_targeted_and_get_a_trainable_copy():
    model = lorakit.get_peft_model(BUILDERS["mlp"](), LoraConfig(target_modules="all-linear", modules_to_save=["head"]))
    assert sorted(n for n, _ in model.base_model.lora_layers()) == ["lin0", "lin1"]
    head = model.base_model.model.head
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


def test_seq_cls_adds_classifier_to_modules_to_save():
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    model = lorakit.get_peft_model(BUILDERS["bert"](), config)
    assert "classifier" in config.modules_to_save
    assert type(model.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"


def test_rank_and_alpha_first_match_wins():
    config = LoraConfig(
        r=8, lora_alpha=4, rank_pattern={r"layers\.0\..*": 2, "q_proj": 6}, alpha_pattern={"q_proj": 1, ".*": 3}
    )
    assert rank_and_alpha(config, "model.layers.0.self_attn.q_proj") == (2, 1)
    assert rank_and_alpha(config, "model.layers.1.self_attn.q_proj") == (6, 1)
    assert rank_and_alpha(config, "model.layers.1.self_attn.v_proj") == (8, 3)
    # PEFT's anchoring: the key must end the path at a dot boundary
    assert rank_and_alpha(LoraConfig(rank_pattern={"proj": 2}), "model.q_proj") == (8, 8)
    assert rank_and_alpha(LoraConfig(rank_pattern={"q_proj": 2}), "xq_proj") == (8, 8)
    assert rank_and_alpha(LoraConfig(rank_pattern={"model.q_proj": 2}), "model.q_proj") == (2, 8)


def test_adding_an_adapter_targets_already_wrapped_layers():
    model = lorakit.get_peft_model(BUILDERS["llama"](), LoraConfig(target_modules=["q_proj"], r=2))
    model.add_adapter("other", LoraConfig(target_modules="all-linear", r=4))
    layers = dict(model.base_model.lora_layers())
    assert len(layers) == 14
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.r == {"default": 2, "other": 4}
    assert not isinstance(q.base_layer, lorakit.LoraLayer)  # extended, not nested


def test_default_targets_agree_with_peft_where_peft_has_an_entry():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    shared = set(PEFT_DEFAULTS) & set(DEFAULT_TARGET_MODULES)
    assert len(shared) >= 30
    for arch in shared:
        ours, theirs = default_target_modules(arch), PEFT_DEFAULTS[arch]
        assert (ours if isinstance(ours, str) else set(ours)) == (theirs if isinstance(theirs, str) else set(theirs))
