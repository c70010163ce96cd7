"""LoraConfig: JSON round trip, reading configs peft writes, peft reading ours, and validation errors."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
from peft.tuners.lora.config import ArrowConfig as PeftArrowConfig
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.config import EvaConfig as PeftEvaConfig

from lorakit import ArrowConfig, CordaConfig, EvaConfig, LoftQConfig, LoraConfig, TaskType
from lorakit.config import CONFIG_NAME

# kwargs valid for both libraries; sub-configs are given as dicts and built per library where needed.
CONFIG_KWARGS = {
    "defaults": {},
    "list_targets": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "regex_targets": dict(target_modules=r".*\.(q|k)_proj", exclude_modules=r".*layers\.0\..*", use_rslora=True),
    "layers": dict(target_modules=["c_attn"], layers_to_transform=[0, 2], layers_pattern="h", fan_in_fan_out=True),
    "patterns": dict(target_modules=["q", "v"], rank_pattern={"q": 2, r"^model\.v": 6}, alpha_pattern={"v": 3}),
    "task_bias": dict(task_type="SEQ_CLS", bias="lora_only", modules_to_save=["classifier"], lora_bias=True),
    "init_gaussian": dict(init_lora_weights="gaussian", layer_replication=[[0, 2], [1, 3]]),
    "init_false": dict(init_lora_weights=False, target_modules="all-linear", inference_mode=True),
    "pissa_niter": dict(init_lora_weights="pissa_niter_4", target_modules=["lin"]),
    "dora": dict(use_dora=True, target_modules=["lin"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"),
    "tokens": dict(target_modules=["lin"], trainable_token_indices={"emb": [1, 2]}, ensure_weight_tying=True),
    "target_parameters": dict(target_modules=[], target_parameters=["experts.gate_up_proj"]),
    "eva": dict(init_lora_weights="eva", eva_config=dict(rho=1.5, tau=0.9, whiten=True)),
    "corda": dict(init_lora_weights="corda", corda_config=dict(corda_method="kpm", verbose=True)),
    "arrow": dict(target_modules=["lin"], arrow_config=dict(top_k=2, router_temperature=0.5, use_gks=True)),
    "loftq_dict": dict(init_lora_weights="loftq", loftq_config=dict(loftq_bits=8, loftq_iter=2)),
}
PEFT_SUB_CONFIGS = {"eva_config": PeftEvaConfig, "corda_config": PeftCordaConfig, "arrow_config": PeftArrowConfig}
SUB_CONFIGS = {"eva_config": EvaConfig, "corda_config": CordaConfig, "arrow_config": ArrowConfig}


def _peft_config(kwargs: dict):
    built = {k: PEFT_SUB_CONFIGS[k](**v) if k in PEFT_SUB_CONFIGS else v for k, v in kwargs.items()}
    if built.get("init_lora_weights") == "loftq":
        # peft insists on scipy for LoftQ at config time; write the same JSON through a config that skips the check
        built = {**built, "init_lora_weights": True}
        config = peft.LoraConfig(**built)
        config.init_lora_weights = "loftq"
        config.loftq_config = dict(kwargs["loftq_config"])
        return config
    return peft.LoraConfig(**built)


def _normalised(data: dict) -> dict:
    """JSON dict with list-valued target/exclude/modules_to_save sorted (peft keeps them as sets), without
    ``peft_version``: the writer's version (lorakit writes the peft version it matches, peft its own)."""
    out = dict(data)
    out.pop("peft_version", None)
    for key in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return out


def _read(path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", sorted(CONFIG_KWARGS))
def test_dict_and_file_round_trip(case, tmp_path):
    kwargs = dict(CONFIG_KWARGS[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(**kwargs)
        assert LoraConfig.from_dict(config.to_dict()) == config
        config.save_pretrained(tmp_path)
        back = LoraConfig.from_pretrained(tmp_path)
    assert back == config
    for name, cls in SUB_CONFIGS.items():
        if name in kwargs:
            assert getattr(back, name) == cls(**kwargs[name])
    text = (tmp_path / CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    assert "runtime_config" not in json.loads(text)


def test_to_dict_is_json_ready_and_uses_peft_value_types():
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, target_modules={"v", "q"}, init_lora_weights="loftq", loftq_config=LoftQConfig()
    )
    data = config.to_dict()
    json.dumps(data)
    assert data["task_type"] == "CAUSAL_LM" and data["peft_type"] == "LORA"
    assert data["target_modules"] == ["q", "v"]
    assert data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


@pytest.mark.parametrize("case", sorted(CONFIG_KWARGS))
def test_reads_configs_peft_writes(case, tmp_path):
    kwargs = CONFIG_KWARGS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_config(kwargs).save_pretrained(tmp_path)
        written = _read(tmp_path)
        ours = LoraConfig.from_pretrained(tmp_path)
    expected = _normalised(written)
    got = _normalised(json.loads(ours.to_json_string()))
    assert got == expected


@pytest.mark.parametrize("case", sorted(CONFIG_KWARGS))
def test_peft_reads_configs_we_write(case, tmp_path):
    kwargs = CONFIG_KWARGS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LoraConfig(**kwargs).save_pretrained(tmp_path)
        if kwargs.get("init_lora_weights") == "loftq":
            pytest.importorskip("scipy")  # peft needs scipy to build a LoftQ config
        theirs = peft.LoraConfig.from_pretrained(tmp_path)
        reference = _peft_config(kwargs)
    ours_fields = _normalised(json.loads(json.dumps(theirs.to_dict(), default=sorted)))
    expected = _normalised(json.loads(json.dumps(reference.to_dict(), default=sorted)))
    ours_fields.pop("runtime_config", None), expected.pop("runtime_config", None)
    assert ours_fields == expected


def test_same_json_as_peft_for_the_same_fields(tmp_path):
    for case, kwargs in CONFIG_KWARGS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _peft_config(kwargs).save_pretrained(tmp_path / "peft")
            LoraConfig(**kwargs).save_pretrained(tmp_path / "ours")
        theirs, ours = _read(tmp_path / "peft"), _read(tmp_path / "ours")
        assert sorted(ours) == sorted(theirs), case
        assert _normalised(ours) == _normalised(theirs), case


def test_reads_old_and_minimal_configs():
    assert LoraConfig.from_dict({"peft_type": "LORA"}) == LoraConfig()
    old = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj"], "enable_lora": None, "merge_weights": False}
    with pytest.warns(UserWarning, match=r"unknown adapter_config keys: \['enable_lora', 'merge_weights'\]"):
        config = LoraConfig.from_dict(old)
    assert config.r == 16 and config.target_modules == ["q_proj"]


def test_unknown_keys_in_a_file_warn_and_are_ignored(tmp_path):
    data = LoraConfig(r=4).to_dict() | {"future_field": 1, "use_fancy": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"\['future_field', 'use_fancy'\]"):
        config = LoraConfig.from_pretrained(tmp_path)
    assert config.r == 4 and not hasattr(config, "future_field")


def test_runtime_config_in_a_file_warns_and_is_ignored(tmp_path):
    data = LoraConfig().to_dict() | {"runtime_config": {"ephemeral_gpu_offload": True}}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        config = LoraConfig.from_pretrained(tmp_path)
    assert config.runtime_config.ephemeral_gpu_offload is False


def test_from_pretrained_keyword_overrides_and_subfolder(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path / "second")
    config = LoraConfig.from_pretrained(tmp_path, subfolder="second", lora_alpha=32)
    assert (config.r, config.lora_alpha) == (4, 32)


def test_save_keeps_inference_mode_as_set(tmp_path):
    LoraConfig(inference_mode=False).save_pretrained(tmp_path)
    assert _read(tmp_path)["inference_mode"] is False


@pytest.mark.parametrize("peft_type", ["IA3", "ADALORA", "PREFIX_TUNING", "lora"])
def test_other_peft_types_raise(peft_type, tmp_path):
    with pytest.raises(ValueError, match=rf"peft_type={peft_type!r}.*LoRA"):
        LoraConfig.from_dict({"peft_type": peft_type, "r": 8})
    with pytest.raises(ValueError, match=rf"peft_type={peft_type!r}"):
        LoraConfig(peft_type=peft_type)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": peft_type}))
    with pytest.raises(ValueError, match=rf"peft_type={peft_type!r}"):
        LoraConfig.from_pretrained(tmp_path)


def test_bad_files_raise_clearly(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object, got list"):
        LoraConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), r"`r` must be a positive integer, got 0"),
        (dict(r=-3), r"`r` must be a positive integer, got -3"),
        (dict(r=2.5), r"`r` must be a positive integer, got 2.5"),
        (dict(r=True), r"`r` must be a positive integer, got True"),
        (dict(lora_dropout=1.0), r"`lora_dropout` must be in \[0, 1\), got 1.0"),
        (dict(lora_dropout=-0.1), r"`lora_dropout` must be in \[0, 1\), got -0.1"),
        (dict(bias="some"), r"`bias` must be one of \('none', 'all', 'lora_only'\), got 'some'"),
        (dict(layers_pattern="layers"), r"`layers_pattern` \('layers'\) is set but `layers_to_transform` is None"),
        (
            dict(target_modules=r".*q_proj", layers_to_transform=[0]),
            r"only apply to a list of target_modules; with a regex target_modules \('\.\*q_proj'\)",
        ),
        (dict(lora_bias=True, use_dora=True), r"`lora_bias=True` cannot be combined with `use_dora=True`"),
        (
            dict(lora_bias=True, init_lora_weights="pissa"),
            r"only works with init_lora_weights True or False, got 'pissa'",
        ),
        (dict(init_lora_weights="pissa_niter_"), r"'pissa_niter_' is malformed: use 'pissa_niter_K'"),
        (dict(init_lora_weights="pissa_niter_x"), r"'pissa_niter_x' is malformed"),
        (dict(init_lora_weights="pissa_niter_-1"), r"'pissa_niter_-1' is malformed"),
        (dict(init_lora_weights=3), r"`init_lora_weights` must be a bool or a method name, got 3"),
        (dict(init_lora_weights="loftq"), r"needs a `loftq_config`"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer, got 0"),
        (dict(task_type="CLASSIFY"), r"Unknown task_type 'CLASSIFY'; expected one of: SEQ_CLS"),
        (dict(target_modules="(unclosed"), r"`target_modules` '\(unclosed' is not a valid regular expression"),
        (dict(target_modules=["q", 3]), r"`target_modules` must be a list of strings or a regex string, got"),
        (dict(target_modules=[]), r"`target_modules` is an empty list"),
        (dict(layer_replication=[[2, 1]]), r"`layer_replication` must be \[start, end\) pairs"),
        (dict(use_qalora=True), r"does not implement the LoRA variant setting\(s\) \['use_qalora'\]"),
        (dict(eva_config=dict(rho=0.5)), r"EvaConfig.rho must be >= 1.0, got 0.5"),
        (dict(arrow_config=dict(top_k=0)), r"ArrowConfig.top_k must be >= 1, got 0"),
        (dict(corda_config=dict(corda_method="xyz")), r"corda_method must be 'ipm' or 'kpm', got 'xyz'"),
        (dict(loftq_config=dict(loftq_bits=3)), r"loftq_bits must be 2, 4 or 8, got 3"),
    ],
)
def test_invalid_values_raise_naming_value_and_expectation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_eva_and_corda_without_sub_config_get_defaults_with_a_warning():
    with pytest.warns(UserWarning, match="EvaConfig"):
        assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()
    with pytest.warns(UserWarning, match="CordaConfig"):
        assert LoraConfig(init_lora_weights="corda").corda_config == CordaConfig()


def test_loftq_config_without_loftq_init_warns():
    with pytest.warns(UserWarning, match="loftq_config.*init_lora_weights"):
        LoraConfig(loftq_config={"loftq_bits": 8})


def test_every_field_has_help_text_and_peft_has_no_field_we_lack():
    fields = dataclasses.fields(LoraConfig)
    assert all(f.metadata.get("help") for f in fields)
    assert {f.name for f in fields} == {f.name for f in dataclasses.fields(peft.LoraConfig)}
