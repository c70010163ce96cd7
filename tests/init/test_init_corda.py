"""CorDA: preprocess_corda + init, against peft on the same calibration batches; caches; bad inputs."""

import peft
import pytest
import torch
from init_helpers import MODELS, assert_same_split, logits, peft_corda

import lorakit
from models import BUILDERS, make_inputs


def calibration(n: int = 4, batch: int = 1, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (batch, 12), generator=g) for _ in range(n)]


def ours_corda(kind: str, method: str, batches, **extra):
    build, targets = MODELS[kind]
    model = build()
    corda = lorakit.CordaConfig(corda_method=method, **extra)
    config = lorakit.LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, init_lora_weights="corda", corda_config=corda
    )
    lorakit.preprocess_corda(model, config, run_model=lambda: [model(x) for x in batches])
    return lorakit.get_peft_model(model, config)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_output_unchanged_and_same_split_as_peft(kind, method):
    build, targets = MODELS[kind]
    batches = calibration()
    inputs = make_inputs(kind)
    ours = ours_corda(kind, method, batches)
    torch.testing.assert_close(logits(ours, inputs), logits(build(), inputs), atol=1e-5, rtol=0)

    ref_model = build()
    corda_cfg = peft.tuners.lora.config.CordaConfig(corda_method=method)
    ref_config = peft.LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, init_lora_weights="corda", corda_config=corda_cfg
    )
    peft_corda().preprocess_corda(ref_model, ref_config, run_model=lambda: [ref_model(x) for x in batches])
    theirs = peft.get_peft_model(ref_model, ref_config)
    assert_same_split(ours, theirs)


def test_batched_calibration_equals_one_sample_per_call():
    """Each row of a batch is one sample (normalised by its own max), as peft's batch-of-one calls."""
    singles = calibration(n=4)
    batched = [torch.cat(singles[:2]), torch.cat(singles[2:])]
    assert_same_split(ours_corda("llama", "ipm", singles), ours_corda("llama", "ipm", batched))


def test_cache_and_covariance_files_replace_the_calibration_run(tmp_path):
    cache, cov = tmp_path / "c" / "cache.pt", tmp_path / "cov.pt"
    first = ours_corda("llama", "kpm", calibration(), cache_file=str(cache), covariance_file=str(cov))
    assert cache.stat().st_size > 0 and cov.stat().st_size > 0
    for extra in ({"cache_file": str(cache)}, {"covariance_file": str(cov)}):
        build, targets = MODELS["llama"]
        model = build()
        corda = lorakit.CordaConfig(corda_method="kpm", **extra)
        config = lorakit.LoraConfig(
            target_modules=targets, r=4, lora_alpha=8, init_lora_weights="corda", corda_config=corda
        )
        lorakit.preprocess_corda(model, config)  # no run_model: read from disk
        assert_same_split(lorakit.get_peft_model(model, config), first)


def test_corda_without_preprocess_is_refused_naming_the_layer():
    config = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="corda")
    with pytest.raises(
        ValueError, match=r"no CorDA decomposition on layer 'model.layers.0.self_attn.q_proj'.*preprocess_corda"
    ):
        lorakit.get_peft_model(MODELS["llama"][0](), config)


def test_preprocess_without_run_model_or_files_is_refused():
    config = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="corda")
    with pytest.raises(ValueError, match="needs run_model"):
        lorakit.preprocess_corda(MODELS["llama"][0](), config)


def test_corda_on_an_embedding_is_refused_naming_the_layer():
    model = BUILDERS["emb"]()
    config = lorakit.LoraConfig(target_modules=["emb", "lin"], r=2, init_lora_weights="corda")
    lorakit.preprocess_corda(model, config, run_model=lambda: model(make_inputs("emb")["ids"]))
    with pytest.raises(ValueError, match=r"cannot initialise layer 'emb' of kind 'embedding'; it supports: linear"):
        lorakit.get_peft_model(model, config)
