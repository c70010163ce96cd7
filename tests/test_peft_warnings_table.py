"""Every warning peft 0.21.2 gives on a LoRA code path, and lorakit's status for it.

Found by grepping peft's ``tuners/lora/*.py``, ``tuners/tuners_utils.py``, ``peft_model.py``, ``mapping_func.py``,
``utils/other.py``, ``utils/save_and_load.py``, ``utils/hotswap.py`` and ``config.py`` for ``warnings.warn`` /
``logger.warning``. Status: ``warns`` = same condition, same warning class (lorakit's wording may differ; a case in
``CASES`` below triggers it in both libraries, and where given a near case checks that both stay silent);
``tested elsewhere`` = the same, tested in the named file; ``n/a`` = the code path does not exist for LoRA in lorakit
(another PEFT method, a feature lorakit does not have), with the reason; ``not done`` = lorakit is silent there.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import import_module

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from models import MLP, tiny_gpt2, tiny_llama

TABLE: list[tuple[str, str, str, str, str]] = [
    # (id, peft location, condition, peft's warning class, lorakit's status)
    (
        "second_time",
        "mapping_func.py:148",
        "get_peft_model on a model that already has LoRA layers",
        "UserWarning",
        "warns",
    ),
    (
        "base_name_renamed",
        "mapping_func.py:154",
        "config's base_model_name_or_path differs from the model's name",
        "UserWarning",
        "n/a: lorakit keeps the base_model_name_or_path the config gives (PEFT replaces it with the model's name "
        "and warns); test_base_model_name_is_kept_not_renamed",
    ),
    (
        "revision_overwrite",
        "mapping_func.py:161",
        "get_peft_model(revision=) differs from config.revision",
        "UserWarning",
        "warns",
    ),
    (
        "eva_low_cpu",
        "mapping_func.py:171",
        'init_lora_weights="eva" without low_cpu_mem_usage',
        "UserWarning",
        "warns",
    ),
    (
        "adapter_name_in_prefix",
        "mapping_func.py:178, peft_model.py:1121",
        'adapter name contained in "lora_" (e.g. "lora")',
        "UserWarning",
        "warns",
    ),
    (
        "loftq_ignored",
        "lora/config.py:1065",
        'loftq_config without init "loftq"',
        "UserWarning",
        "warns",
    ),
    (
        "eva_no_config",
        "lora/config.py:1068",
        'init "eva" without eva_config',
        "UserWarning",
        "warns",
    ),
    (
        "eva_ignored",
        "lora/config.py:1071",
        'eva_config without init "eva"',
        "UserWarning",
        "warns",
    ),
    (
        "corda_no_config",
        "lora/config.py:1074",
        'init "corda" without corda_config',
        "UserWarning",
        "warns",
    ),
    (
        "corda_ignored",
        "lora/config.py:1079",
        'corda_config without init "corda"',
        "UserWarning",
        "warns",
    ),
    (
        "alora_not_causal",
        "lora/config.py:1091",
        "alora_invocation_tokens with a task other than CAUSAL_LM",
        "UserWarning",
        "warns",
    ),
    (
        "rslora_patterns",
        "lora/config.py:1113",
        "rsLoRA + rank/alpha patterns + PiSSA/OLoRA/CorDA",
        "UserWarning",
        "warns",
    ),
    (
        "lora_bias_no_bias",
        "lora/layer.py:243, 1600",
        "lora_bias on a base layer without bias",
        "PeftWarning",
        "warns",
    ),
    (
        "tp_plan",
        "lora/layer.py:365, lora/model.py:417",
        "transformers tensor-parallel plan other than colwise/rowwise",
        "UserWarning",
        "n/a: lorakit has no tensor-parallel (tp_plan) support",
    ),
    (
        "unmerge_unmerged",
        "lora/layer.py:1027 (and every layer type)",
        "unmerge with nothing merged",
        "UserWarning",
        "warns (once per call, PEFT once per layer)",
    ),
    (
        "conv_groups",
        "lora/layer.py:1563",
        "LoRA on a Conv with groups > 1",
        "UserWarning",
        "warns (merging it then raises)",
    ),
    (
        "parametrization_missing",
        "lora/layer.py:2630",
        "internal invariant of PEFT's ParamWrapper",
        "UserWarning",
        "n/a: PEFT-internal state lorakit does not have",
    ),
    (
        "fan_in_fan_out_linear",
        "lora/layer.py:2752",
        "fan_in_fan_out=True on nn.Linear",
        "UserWarning",
        "warns",
    ),
    (
        "fan_in_fan_out_conv1d",
        "lora/layer.py:2760",
        "fan_in_fan_out=False on transformers Conv1D",
        "UserWarning",
        "warns",
    ),
    (
        "pissa_quantised_conversion",
        "lora/model.py:1081",
        'converting an adapter named "pissa*" on a quantised base',
        "UserWarning",
        "warns",
    ),
    (
        "path_initial_non_pissa",
        "lora/model.py:1159",
        "path_initial_model_for_weight_conversion for an init that changes no base weight",
        "UserWarning",
        "warns; PEFT never does (it resets init_lora_weights to True before the check)",
    ),
    (
        "convert_lora_to_lora",
        "lora/conversion.py:246",
        "convert_to_lora on a LoRA adapter",
        "UserWarning",
        "n/a: lorakit has no convert_to_lora",
    ),
    (
        "alora_unknown_adapter",
        "lora/variants.py:680",
        "aLoRA offsets for an adapter name not in the config",
        "UserWarning",
        "n/a: lorakit refuses unknown adapter names in a batch (ValueError)",
    ),
    (
        "alora_inputs_embeds",
        "lora/variants.py:756",
        "aLoRA forward with inputs_embeds only",
        "UserWarning",
        "warns",
    ),
    (
        "alora_generate_no_ids",
        "lora/variants.py:802",
        "aLoRA generate without input_ids",
        "UserWarning",
        "warns",
    ),
    (
        "monteclora_nan",
        "lora/variants.py:1242",
        "MonteCLoRA sampling",
        "UserWarning",
        "n/a: MonteCLoRA is not implemented",
    ),
    (
        "eva_devices, eva_inputs, eva_distributed, eva_missing",
        "lora/eva.py:221, 237, 322, 549",
        "EVA data collection edge cases",
        "UserWarning",
        "warns (distributed and unmovable inputs: test_eva_notes_...; a model on several devices and layers left "
        "at the default init: lorakit's own wording, not compared here)",
    ),
    (
        "bnb_merge_rounding",
        "lora/bnb.py:99, 149, 377, 426",
        "merge/unmerge into 8-bit/4-bit weights",
        "UserWarning",
        "warns",
    ),
    (
        "unsupported_layer",
        "tuners_utils.py:241",
        "in/out features of an unknown layer type",
        "UserWarning",
        "n/a: lorakit refuses module types it has no layer for (ValueError naming them)",
    ),
    (
        "peft_config_attr",
        "tuners_utils.py:331",
        "the model already carries a `peft_config` attribute",
        "UserWarning",
        "warns (lorakit leaves the attribute alone; PEFT adds the new config to it)",
    ),
    (
        "bias_disable",
        "tuners_utils.py:564",
        'disable_adapter_layers with bias != "none"',
        "UserWarning",
        "warns",
    ),
    (
        "merge_tied_target",
        "tuners_utils.py:671",
        "merging LoRA on embed_tokens/lm_head of a tie_word_embeddings model",
        "UserWarning",
        "warns",
    ),
    (
        "untied_after_merge",
        "tuners_utils.py:733",
        "merging unties input and output embeddings",
        "UserWarning",
        "tested elsewhere: tests/model/test_peft_warnings.py",
    ),
    (
        "state_dict_targets",
        "tuners_utils.py:1049",
        "inject_adapter_in_model(state_dict=) targets differ from the config's",
        "RuntimeWarning",
        "warns",
    ),
    (
        "exclude_unused",
        "tuners_utils.py:1090",
        "exclude_modules that exclude nothing",
        "UserWarning",
        "warns",
    ),
    (
        "target_modules_unmatched",
        "tuners_utils.py:1101",
        "target_modules match nothing while target_parameters match",
        "RuntimeWarning",
        "warns",
    ),
    (
        "target_parameters_unmatched",
        "tuners_utils.py:1105",
        "target_parameters match nothing while target_modules match",
        "RuntimeWarning",
        "warns",
    ),
    (
        "pattern_unmatched",
        "tuners_utils.py:1123",
        "rank_pattern/alpha_pattern keys matching no targeted module",
        "RuntimeWarning",
        "warns",
    ),
    (
        "tying_default",
        "tuners_utils.py:1406, 1415, 1472",
        "weight tying for a PEFT method without a tying implementation",
        "UserWarning",
        "n/a: other PEFT methods",
    ),
    (
        "tying_nothing_added",
        "tuners_utils.py:1447",
        "ensure_weight_tying, tied model, embedding neither saved nor targeted",
        "UserWarning",
        "tested elsewhere: tests/model/test_weight_tying.py",
    ),
    (
        "tying_no_tied_model",
        "tuners_utils.py:1452",
        "ensure_weight_tying on a model without tied weights",
        "UserWarning",
        "warns",
    ),
    (
        "tied_without_ensure",
        "tuners_utils.py:1463",
        "a tied layer in the adapter without ensure_weight_tying",
        "UserWarning",
        "warns",
    ),
    (
        "embed_scale_shape",
        "tuners_utils.py:1932",
        "non-scalar embed_scale",
        "PeftWarning",
        "not done: lorakit applies a non-scalar embed_scale (broadcast over the output) instead of dropping it",
    ),
    (
        "delete_active",
        "tuners_utils.py:2119, peft_model.py:1191",
        "deleting the active adapter while others remain",
        "UserWarning",
        "warns",
    ),
    (
        "merge_more",
        "tuners_utils.py:2511",
        "merging more adapters on top of merged ones",
        "UserWarning",
        "warns",
    ),
    (
        "merge_all_merged",
        "tuners_utils.py:2516",
        "merging when everything is merged",
        "UserWarning",
        "warns",
    ),
    (
        "set_adapter_merged",
        "tuners_utils.py:2640",
        "set_adapter on a merged model",
        "UserWarning",
        "warns",
    ),
    (
        "ephemeral_offload",
        "peft_model.py:518",
        "ephemeral_gpu_offload for a method without runtime_config",
        "UserWarning",
        "n/a: LoRA has runtime_config",
    ),
    (
        "missing_keys_on_load",
        "peft_model.py:642",
        "adapter keys missing from the loaded checkpoint",
        "UserWarning",
        "warns",
    ),
    (
        "prompt_learning",
        "peft_model.py:881, 1673, 1677, 2578",
        "prefix/prompt tuning inputs",
        "UserWarning",
        "n/a: prompt-learning methods",
    ),
    (
        "disable_irregular",
        "peft_model.py:1064",
        "disable_adapter() with some layers enabled, others not",
        "UserWarning",
        "warns",
    ),
    (
        "pissa_with_others",
        "peft_model.py:1401, 1408, 1415",
        "load_adapter next to a PiSSA/CorDA/OLoRA adapter",
        "UserWarning",
        "warns",
    ),
    (
        "gc_kwargs_old_transformers",
        "utils/other.py:247",
        "gradient_checkpointing_kwargs on a transformers without them",
        "FutureWarning",
        "n/a: lorakit requires a transformers that has them",
    ),
    (
        "hub_lookup_failed",
        "utils/other.py:1508, save_and_load.py:313",
        "the Hub lookup of the base config fails",
        "UserWarning",
        "n/a: lorakit reads the base config from local files and the cache only (no Hub request that could fail); "
        "a base config it cannot find counts as not resized, silently",
    ),
    (
        "tokens_tying_untied",
        "utils/other.py:1653",
        "trainable_token_indices + ensure_weight_tying on an untied model",
        "UserWarning",
        "warns",
    ),
    (
        "malformed_lora_save",
        "utils/save_and_load.py:86",
        "saving 1-D or empty lora_A/lora_B (ungathered shards)",
        "PeftWarning",
        "warns",
    ),
    (
        "save_embedding_auto",
        "utils/save_and_load.py:296",
        'save_embedding_layers="auto" with a targeted embedding',
        "UserWarning",
        "warns",
    ),
    (
        "save_embedding_resized",
        "utils/save_and_load.py:327",
        'save_embedding_layers="auto" after resizing the vocabulary',
        "UserWarning",
        "warns",
    ),
    (
        "save_embedding_not_hf",
        "utils/save_and_load.py:344",
        "save_embedding_layers=True on a non-transformers model",
        "UserWarning",
        "warns",
    ),
    (
        "ignore_mismatched",
        "utils/save_and_load.py:668",
        "ignore_mismatched_sizes skipped tensors",
        "UserWarning",
        "warns",
    ),
    (
        "dev_version_hash",
        "config.py:118",
        "a dev build of PEFT without a git hash",
        "UserWarning",
        "n/a: lorakit writes a fixed format version",
    ),
    (
        "config_unexpected_key",
        "config.py:220",
        "adapter_config.json with unknown keys",
        "UserWarning",
        "warns",
    ),
    (
        "config_runtime_config",
        "config.py:284",
        "adapter_config.json with a runtime_config key",
        "UserWarning",
        "warns",
    ),
    (
        "hotswap_compiled",
        "utils/hotswap.py:383",
        'prepare_model_for_compiled_hotswap on a compiled model (check_compiled="warn")',
        "UserWarning",
        "warns",
    ),
]
STATUS = {row[0]: row[4] for row in TABLE}


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class _GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.plain = nn.Conv2d(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.plain(x)


def _cfg(lib, **kwargs):
    return lib.LoraConfig(**kwargs)


def _corda_config(lib):
    return lib.CordaConfig() if hasattr(lib, "CordaConfig") else import_module("peft.tuners.lora.config").CordaConfig()


def _two_adapters(lib, **kwargs):
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], **kwargs))
    model.add_adapter("other", _cfg(lib, target_modules=["lin0"]))
    return model


def _save(model, **kwargs):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **kwargs)


def _resized(lib, tmp, grow):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp)
    base = AutoModelForCausalLM.from_pretrained(tmp)
    if grow:
        base.resize_token_embeddings(100)
    _save(lib.get_peft_model(base, _cfg(lib, target_modules=["q_proj"])))


def _config_file(lib, tmp, extra):
    config = {
        k: sorted(v) if isinstance(v, set) else v for k, v in _cfg(lib, target_modules=["lin0"]).to_dict().items()
    }
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump({**config, **extra}, f)
    lib.LoraConfig.from_pretrained(tmp)


def _mismatched(lib, tmp, r):
    lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], r=4)).save_pretrained(tmp)
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], r=r))
    lib.set_peft_model_state_dict(model, lib.load_peft_weights(tmp), ignore_mismatched_sizes=True)


def _malformed(lib, empty):
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"]))
    if empty:
        model.base_model.model.lin0.lora_A["default"].weight = nn.Parameter(torch.zeros(0))
    _save(model)


def _hotswap(lib, compiled):
    hotswap = import_module(lib.__name__ + ".utils.hotswap")
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"]))
    hotswap.prepare_model_for_compiled_hotswap(
        torch.compile(model) if compiled else model, target_rank=16, check_compiled="warn"
    )


def _irregular(lib, irregular):
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0", "lin1"]))
    model.base_model.model.lin0.enable_adapters(not irregular)
    with model.disable_adapter():
        pass


def _alora(lib, embeds_only):
    config = _cfg(lib, task_type="CAUSAL_LM", target_modules=["q_proj"], alora_invocation_tokens=[5, 6])
    model = lib.get_peft_model(tiny_llama(), config)
    if embeds_only:
        model(inputs_embeds=torch.randn(1, 4, 32))
    else:
        model(input_ids=torch.tensor([[1, 5, 6, 2]]))


def _alora_generate(lib, embeds_only):
    config = _cfg(lib, task_type="CAUSAL_LM", target_modules=["q_proj"], alora_invocation_tokens=[5, 6])
    model = lib.get_peft_model(tiny_llama(), config)
    inputs = {"inputs_embeds": torch.randn(1, 4, 32)} if embeds_only else {"input_ids": torch.tensor([[1, 5, 6, 2]])}
    model.generate(**inputs, max_new_tokens=2, do_sample=False)


def _load_next_to(lib, tmp, init):
    lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"])).save_pretrained(tmp)
    model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], init_lora_weights=init))
    model.load_adapter(tmp, adapter_name="other")


def _pissa_on_quantised(lib, tmp, folder):
    base = MLP()
    base.register_parameter("q", nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))  # "quantised"
    model = lib.get_peft_model(base, _cfg(lib, target_modules=["lin0"], init_lora_weights="pissa", r=2))
    model.save_pretrained(os.path.join(tmp, folder))
    model.save_pretrained(os.path.join(tmp, "out"), path_initial_model_for_weight_conversion=os.path.join(tmp, folder))


def _with_peft_config_attr(lib, has_attr, inject):
    model = MLP()
    if has_attr:
        model.peft_config = {"earlier": lib.LoraConfig(target_modules=["lin1"])}
    if inject:
        lib.inject_adapter_in_model(_cfg(lib, target_modules=["lin0"]), model)
    else:
        lib.get_peft_model(model, _cfg(lib, target_modules=["lin0"]))


def _missing_keys(lib, tmp, drop):
    from safetensors.torch import load_file, save_file

    lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"])).save_pretrained(tmp)
    path = os.path.join(tmp, "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not (drop and "lora_B" in k)}, path, metadata={"format": "pt"})
    lib.PeftModel.from_pretrained(MLP(), tmp)


def _merge(lib, again):
    model = _two_adapters(lib)
    model.base_model.merge_adapter(["default"])
    model.base_model.merge_adapter(["default", "other"] if again else ["default"])


@dataclass
class Case:
    build: Callable  # build(lib, *args): triggers the condition
    category: type[Warning]  # peft's class (lorakit's by name)
    peft_text: str
    ours_text: str
    warn_args: tuple = ()
    quiet_args: tuple | None = None  # a near case where neither library warns (None: not checked)
    tmp: bool = False  # build takes a fresh folder first


_UW = UserWarning
CASES: dict[str, Case] = {
    "second_time": Case(
        lambda lib, twice: [lib.get_peft_model(m, _cfg(lib, target_modules=["lin0"])) for m in [MLP()] * (1 + twice)],
        _UW,
        "modify a model with PEFT for a second time",
        "modify a model with PEFT for a second time",
        (True,),
        (False,),
    ),
    "revision_overwrite": Case(
        lambda lib, rev: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], revision="v1"), revision=rev),
        _UW,
        "overwriting with revision v2",
        "overwriting with revision v2",
        ("v2",),
        ("v1",),
    ),
    "eva_low_cpu": Case(
        lambda lib, low: lib.get_peft_model(
            MLP(),
            _cfg(lib, target_modules=["lin0"], init_lora_weights="eva", eva_config=lib.EvaConfig()),
            low_cpu_mem_usage=low,
        ),
        _UW,
        "low_cpu_mem_usage=False",
        "low_cpu_mem_usage=False",
        (False,),
        (True,),
    ),
    "adapter_name_in_prefix": Case(
        lambda lib, name: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"]), adapter_name=name),
        _UW,
        "should not be contained in the prefix",
        "should not be contained in the prefix",
        ("lora",),
        ("loral",),
    ),
    "loftq_ignored": Case(
        lambda lib: lib.LoraConfig(loftq_config=lib.LoftQConfig()), _UW, "loftq_config", "loftq_config"
    ),
    "eva_no_config": Case(lambda lib: lib.LoraConfig(init_lora_weights="eva"), _UW, "eva_config", "eva_config"),
    "eva_ignored": Case(lambda lib: lib.LoraConfig(eva_config=lib.EvaConfig()), _UW, "eva_config", "eva_config"),
    "corda_no_config": Case(lambda lib: lib.LoraConfig(init_lora_weights="corda"), _UW, "corda_config", "corda_config"),
    "corda_ignored": Case(
        lambda lib: lib.LoraConfig(corda_config=_corda_config(lib)), _UW, "corda_config", "corda_config"
    ),
    "alora_not_causal": Case(
        lambda lib, task: lib.LoraConfig(alora_invocation_tokens=[1, 2], task_type=task),
        _UW,
        "aLoRA is currently only supported for CAUSAL_LM",
        "CAUSAL_LM",
        ("SEQ_CLS",),
        ("CAUSAL_LM",),
    ),
    "rslora_patterns": Case(
        lambda lib, init: lib.LoraConfig(init_lora_weights=init, use_rslora=True, rank_pattern={"lin0": 4}),
        _UW,
        "Rank-Stabilized LoRA with rank_pattern",
        "Rank-Stabilized LoRA with rank_pattern",
        ("pissa",),
        (True,),
    ),
    "lora_bias_no_bias": Case(
        lambda lib, name: lib.get_peft_model(MLP(), _cfg(lib, target_modules=[name], lora_bias=True)),
        peft.PeftWarning,
        "has no bias",
        "has no bias",
        ("lin1",),
        ("lin0",),
    ),
    "unmerge_unmerged": Case(
        lambda lib, merge: (
            [m.merge_adapter() if merge else None, m.unmerge_adapter()]
            if (m := lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"])))
            else None
        ),
        _UW,
        "Already unmerged",
        "Already unmerged",
        (False,),
        (True,),
    ),
    "conv_groups": Case(
        lambda lib, name: lib.get_peft_model(_GroupedConv(), _cfg(lib, target_modules=[name], r=2)),
        _UW,
        "groups > 1",
        "groups > 1",
        ("conv",),
        ("plain",),
    ),
    "fan_in_fan_out_linear": Case(
        lambda lib, fifo: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], fan_in_fan_out=fifo)),
        _UW,
        "fan_in_fan_out is set to True",
        "fan_in_fan_out=True",
        (True,),
        (False,),
    ),
    "fan_in_fan_out_conv1d": Case(
        lambda lib, fifo: lib.get_peft_model(tiny_gpt2(), _cfg(lib, target_modules=["c_attn"], fan_in_fan_out=fifo)),
        _UW,
        "fan_in_fan_out is set to False",
        "fan_in_fan_out=False",
        (False,),
        (True,),
    ),
    "alora_inputs_embeds": Case(_alora, _UW, "only inputs_embeds", "only inputs_embeds", (True,), (False,)),
    "alora_generate_no_ids": Case(
        _alora_generate, _UW, "during generate as input_ids are not available", "only inputs_embeds", (True,), (False,)
    ),
    "pissa_with_others": Case(
        _load_next_to,
        _UW,
        "PiSSA changes the base weights",
        "PiSSA changes the base weights",
        ("pissa",),
        (True,),
        tmp=True,
    ),
    "pissa_quantised_conversion": Case(
        _pissa_on_quantised, _UW, "Quant(W_res) + AB", "Quant(W_res) + AB", ("pissa_init",), ("init",), tmp=True
    ),
    "peft_config_attr": Case(
        _with_peft_config_attr,
        _UW,
        "Already found a `peft_config`",
        "Already found a `peft_config`",
        (True, True),
        (False, True),
    ),
    "peft_config_attr_get_peft_model": Case(
        _with_peft_config_attr,
        _UW,
        "Already found a `peft_config`",
        "Already found a `peft_config`",
        (True, False),
        (False, False),
    ),
    "missing_keys_on_load": Case(
        _missing_keys, _UW, "missing adapter keys", "missing adapter keys", (True,), (False,), tmp=True
    ),
    "bias_disable": Case(
        lambda lib, bias: lib.get_peft_model(
            MLP(), _cfg(lib, target_modules=["lin0"], bias=bias)
        ).base_model.disable_adapter_layers(),
        _UW,
        "bias configured to be 'all'",
        "trains biases",
        ("all",),
        ("none",),
    ),
    "merge_tied_target": Case(
        lambda lib, target: lib.get_peft_model(_tied_llama(), _cfg(lib, target_modules=[target])).merge_adapter(),
        _UW,
        "tied_target_modules=['lm_head']",
        "tied_target_modules=['lm_head']",
        ("lm_head",),
        ("q_proj",),
    ),
    "state_dict_targets": Case(
        lambda lib, target: lib.inject_adapter_in_model(
            _cfg(lib, target_modules=[target]),
            MLP(),
            state_dict={"lin0.lora_A.weight": torch.zeros(8, 10), "lin0.lora_B.weight": torch.zeros(20, 8)},
        ),
        RuntimeWarning,
        "inconsistency was discovered",
        "inconsistency was discovered",
        ("lin1",),
        ("lin0",),
    ),
    "exclude_unused": Case(
        lambda lib, ex: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0", "lin1"], exclude_modules=[ex])),
        _UW,
        "exclude_modules",
        "exclude_modules",
        ("zzz",),
        ("lin1",),
    ),
    "target_modules_unmatched": Case(
        lambda lib, t: lib.get_peft_model(MLP(), _cfg(lib, target_modules=[t], target_parameters=["lin0.weight"])),
        RuntimeWarning,
        "no module was matched",
        "no module was matched",
        ("zzz",),
        ("lin1",),
    ),
    "target_parameters_unmatched": Case(
        lambda lib, p: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], target_parameters=[p])),
        RuntimeWarning,
        "no parameter was matched",
        "no parameter was matched",
        ("zzz.weight",),
        ("lin1.weight",),
    ),
    "pattern_unmatched": Case(
        lambda lib, key: lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], alpha_pattern={key: 2})),
        RuntimeWarning,
        "alpha_pattern",
        "alpha_pattern",
        ("zzz",),
        ("lin0",),
    ),
    "tying_no_tied_model": Case(
        lambda lib: lib.get_peft_model(tiny_llama(), _cfg(lib, target_modules=["lm_head"], ensure_weight_tying=True)),
        _UW,
        "no tied modules were found in the model",
        "no tied modules were found in the model",
    ),
    "tied_without_ensure": Case(
        lambda lib, target: lib.get_peft_model(_tied_llama(), _cfg(lib, target_modules=[target])),
        _UW,
        "but `ensure_weight_tying` is not",
        "but `ensure_weight_tying` is not",
        ("lm_head",),
        ("q_proj",),
    ),
    "delete_active": Case(
        lambda lib, name: _two_adapters(lib).delete_adapter(name),
        _UW,
        "was active which is now deleted",
        "was active which is now deleted",
        ("default",),
        ("other",),
    ),
    "merge_more": Case(
        _merge, _UW, "You are now additionally merging other", "You are now additionally merging other", (True,)
    ),
    "merge_all_merged": Case(
        _merge, _UW, "All adapters are already merged", "All adapters are already merged", (False,)
    ),
    "set_adapter_merged": Case(
        lambda lib, merge: (
            [m.merge_adapter() if merge else None, m.set_adapter("other")] if (m := _two_adapters(lib)) else None
        ),
        _UW,
        "Adapter cannot be set when the model is merged",
        "unmerging before switching",
        (True,),
        (False,),
    ),
    "disable_irregular": Case(
        _irregular,
        _UW,
        "some adapter layers that are enabled",
        "some adapter layers that are enabled",
        (True,),
        (False,),
    ),
    "tokens_tying_untied": Case(
        lambda lib: lib.get_peft_model(
            tiny_llama(), _cfg(lib, target_modules=["q_proj"], trainable_token_indices=[1, 2], ensure_weight_tying=True)
        ),
        _UW,
        "ensure_weight_tying=True but the model does not have tied weights",
        "ensure_weight_tying=True but the model has no output layer tied",
    ),
    "malformed_lora_save": Case(_malformed, peft.PeftWarning, "invalid shape", "invalid shape", (True,), (False,)),
    "save_embedding_auto": Case(
        lambda lib, target: _save(lib.get_peft_model(tiny_llama(), _cfg(lib, target_modules=[target]))),
        _UW,
        "as embedding layers found in `target_modules`",
        "as embedding layers found in `target_modules`",
        ("embed_tokens",),
        ("q_proj",),
    ),
    "save_embedding_resized": Case(_resized, _UW, "has been resized", "has been resized", (True,), (False,), tmp=True),
    "save_embedding_not_hf": Case(
        lambda lib, save: _save(
            lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"])), save_embedding_layers=save
        ),
        _UW,
        "not a 🤗 transformers model",
        "not a 🤗 transformers model",
        (True,),
        (False,),
    ),
    "ignore_mismatched": Case(
        _mismatched, _UW, "ignore_mismatched_sizes", "ignore_mismatched_sizes", (8,), (4,), tmp=True
    ),
    "config_unexpected_key": Case(_config_file, _UW, "zzz_new", "zzz_new", ({"zzz_new": 1},), ({},), tmp=True),
    "config_runtime_config": Case(
        _config_file, _UW, "runtime_config", "runtime_config", ({"runtime_config": {}},), ({},), tmp=True
    ),
    "hotswap_compiled": Case(_hotswap, _UW, "already compiled", "already compiled", (True,), (False,)),
}


def _record(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return list(seen)


def _run(case: Case, lib, args: tuple, tmp_path, tag: str):
    if case.tmp:
        folder = tmp_path / f"{lib.__name__}-{tag}"
        folder.mkdir()
        return _record(lambda: case.build(lib, str(folder), *args))
    return _record(lambda: case.build(lib, *args))


def _hits(seen, text: str, category_name: str) -> list:
    return [w for w in seen if text in str(w.message) and w.category.__name__ == category_name]


def test_table_and_cases_agree():
    ids = [row[0] for row in TABLE]
    assert len(ids) == len(set(ids)) >= 60
    warns = {name for name, status in STATUS.items() if status.startswith("warns")}
    assert warns == (set(CASES) - {"peft_config_attr_get_peft_model"}) | {
        "path_initial_non_pissa",
        "bnb_merge_rounding",
        "eva_devices, eva_inputs, eva_distributed, eva_missing",
    }
    assert all(re.match(r"(warns|tested elsewhere: |n/a: |not done)", s) for s in STATUS.values()), STATUS


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_warn_with_the_same_class(name, tmp_path):
    case = CASES[name]
    category = case.category.__name__
    theirs = _run(case, peft, case.warn_args, tmp_path, "warn")
    assert _hits(theirs, case.peft_text, category), f"peft no longer warns: {[str(w.message) for w in theirs]}"
    ours = _run(case, lorakit, case.warn_args, tmp_path, "warn")
    assert _hits(ours, case.ours_text, category), [(w.category.__name__, str(w.message)) for w in ours]
    if case.category is peft.PeftWarning:
        assert all(issubclass(w.category, lorakit.PeftWarning) for w in _hits(ours, case.ours_text, category))


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.quiet_args is not None))
def test_both_silent_on_the_near_case(name, tmp_path):
    case = CASES[name]
    for lib, text in ((peft, case.peft_text), (lorakit, case.ours_text)):
        seen = _run(case, lib, case.quiet_args, tmp_path, "quiet")
        assert not [w for w in seen if text in str(w.message)], (lib.__name__, [str(w.message) for w in seen])


def test_path_initial_conversion_warns_where_peft_cannot(tmp_path):
    """PEFT resets init_lora_weights to True before its check, so its warning never fires; lorakit warns."""
    for lib in (peft, lorakit):
        model = lib.get_peft_model(MLP(), _cfg(lib, target_modules=["lin0"], init_lora_weights="gaussian"))
        init = tmp_path / lib.__name__ / "init"
        init.mkdir(parents=True)
        model.save_pretrained(str(init))
        out, kwargs = str(init.parent / "out"), {"path_initial_model_for_weight_conversion": str(init)}
        seen = _record(partial(model.save_pretrained, out, **kwargs))
        hits = [w for w in seen if re.search("path_initial_model_for_weight_conversion", str(w.message))]
        assert bool(hits) is (lib is lorakit), [str(w.message) for w in seen]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_merging_into_quantised_layers_warns_about_rounding(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from bnb_helpers import load_quantised, tiny_llama64

    tiny_llama64().save_pretrained(tmp_path)
    width = bits[0]
    for lib, merge_text, unmerge_text in (
        (peft, f"Merge lora module to {width}-bit linear", f"Unmerge lora module to {width}-bit linear"),
        (lorakit, f"Merging LoRA into a {width}-bit layer", f"Unmerging LoRA from a {width}-bit layer"),
    ):
        model = lib.get_peft_model(load_quantised(tmp_path, bits), _cfg(lib, target_modules=["q_proj"]))
        assert not _hits(_record(model.unmerge_adapter), unmerge_text, "UserWarning")  # nothing merged
        assert _hits(_record(model.merge_adapter), merge_text, "UserWarning"), lib.__name__
        assert _hits(_record(model.unmerge_adapter), unmerge_text, "UserWarning"), lib.__name__


def _eva_state(lib, data):
    config = _cfg(lib, target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="eva", eva_config=lib.EvaConfig())
    return _record(lambda: lib.get_eva_state_dict(tiny_llama(), data, config, show_progress_bar=False))


def _batches(extra: dict) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 96, (2, 8), generator=g), **extra} for _ in range(4)]


def test_eva_notes_on_distributed_runs_and_unmovable_inputs():
    """eva_distributed and eva_inputs: a one-process gloo group, and a batch value that is neither tensor nor
    container (peft warns for it, as lorakit now)."""
    import torch.distributed as dist

    for lib in (peft, lorakit):
        assert not _hits(_eva_state(lib, _batches({})), "torch.distributed is initialized", "UserWarning")
        hits = _hits(_eva_state(lib, _batches({"note": "text"})), "could not be moved", "UserWarning")
        assert hits, lib.__name__
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    try:
        for lib in (peft, lorakit):
            assert _hits(_eva_state(lib, _batches({})), "torch.distributed is initialized", "UserWarning"), lib.__name__
    finally:
        dist.destroy_process_group()


def test_base_model_name_is_kept_not_renamed():
    """Deliberate difference: PEFT replaces a base_model_name_or_path the config gives by the model's own name (with
    a warning); lorakit keeps it silently (the CLI records the --model the user typed) and fills it only when None."""
    for lib in (peft, lorakit):
        model = tiny_llama()
        model.name_or_path = "new/name"
        config = _cfg(lib, target_modules=["q_proj"], base_model_name_or_path="old/name")
        seen = _record(partial(lib.get_peft_model, model, config))
        renamed = _hits(seen, "was renamed from 'old/name'", "UserWarning")
        assert bool(renamed) is (lib is peft)
        assert config.base_model_name_or_path == ("new/name" if lib is peft else "old/name")
