"""Property tests: lorakit's target and pattern decisions equal peft's on random module paths and configs.

peft's ``check_target_module_exists`` and ``get_pattern_key`` are pure functions of (config, path), so random
inputs compare the two libraries' rules directly (the model-level parity lives in test_parity_core.py).
"""

from __future__ import annotations

import warnings

import peft
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from lorakit import LoraConfig
from lorakit.targeting import is_target, rank_and_alpha

SEGMENTS = [
    "model",
    "layers",
    "h",
    "blocks",
    "0",
    "1",
    "2",
    "10",
    "self_attn",
    "attn",
    "q_proj",
    "k_proj",
    "mlp",
    "lin",
]
paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(".".join)
suffixes = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join)
name_lists = st.lists(suffixes, min_size=1, max_size=3, unique=True)
regexes = st.sampled_from(
    [r".*q_proj", r"model\..*", r".*\.(0|1)\..*", r"h\.\d+\.attn", r".*layers\.1\.mlp\.lin", "lin"]
)
layer_filters = st.one_of(
    st.none(),
    st.integers(0, 2),
    st.lists(st.integers(0, 10), min_size=0, max_size=3),
)
layer_patterns = st.one_of(st.none(), st.sampled_from(["layers", "h", "blocks"]), st.just(["h", "layers"]))


@st.composite
def list_configs(draw) -> dict:
    kwargs = dict(target_modules=draw(name_lists))
    layers = draw(layer_filters)
    if layers is not None:
        kwargs["layers_to_transform"] = layers
        kwargs["layers_pattern"] = draw(layer_patterns)
    exclude = draw(st.one_of(st.none(), name_lists, regexes))
    if exclude is not None:
        kwargs["exclude_modules"] = exclude
    saved = draw(st.one_of(st.none(), st.lists(st.sampled_from(["mlp", "lin", "attn"]), max_size=1)))
    if saved:
        kwargs["modules_to_save"] = saved
    return kwargs


def _both(kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig(**kwargs), peft.LoraConfig(**kwargs)


@settings(max_examples=400, deadline=None)
@given(kwargs=list_configs(), keys=st.lists(paths, min_size=1, max_size=8))
def test_list_targets_layer_filters_and_exclusions_agree_with_peft(kwargs, keys):
    ours, theirs = _both(kwargs)
    for key in keys:
        assert is_target(ours, key) == bool(check_target_module_exists(theirs, key)), (kwargs, key)


@settings(max_examples=200, deadline=None)
@given(target=regexes, exclude=st.one_of(st.none(), name_lists, regexes), keys=st.lists(paths, min_size=1, max_size=8))
def test_regex_targets_agree_with_peft(target, exclude, keys):
    ours, theirs = _both(dict(target_modules=target, exclude_modules=exclude))
    for key in keys:
        assert is_target(ours, key) == bool(check_target_module_exists(theirs, key)), (target, exclude, key)


pattern_keys = st.sampled_from(["q_proj", r"layers\.1\..*", "lin", r"self_attn\.q_proj", "0.mlp.lin", ".*", "k_pro"])


@settings(max_examples=300, deadline=None)
@given(
    rank_keys=st.lists(pattern_keys, max_size=4, unique=True),
    alpha_keys=st.lists(pattern_keys, max_size=4, unique=True),
    keys=st.lists(paths, min_size=1, max_size=8),
)
def test_rank_and_alpha_patterns_agree_with_peft(rank_keys, alpha_keys, keys):
    rank_pattern = {k: i + 2 for i, k in enumerate(rank_keys)}
    alpha_pattern = {k: 3 * i + 1 for i, k in enumerate(alpha_keys)}
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    for key in keys:
        expected_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), 8)
        expected_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), 16)
        assert rank_and_alpha(config, key) == (expected_r, expected_alpha), key
