"""``lorakit generate`` (one adapter, a mixed batch of several) and ``lorakit merge`` (standalone model reloads)."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from cli_helpers import load_tiny, run_cli, tiny_lm_dir
from safetensors.torch import load_file

import lorakit

PROMPTS = ["Copy cat1:", "Copy dog22:", "Hello"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and two random (init False) adapters that change its greedy outputs."""
    root = tmp_path_factory.mktemp("gen")
    model = tiny_lm_dir(root / "model")
    adapters = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = lorakit.LoraConfig(
            r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        lorakit.get_peft_model(load_tiny(model), config).save_pretrained(root / name)
        adapters[name] = root / name
    return model, adapters


def _greedy(model, tokenizer, prompt: str, n: int = 12) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _expected(setup, adapter: str | None) -> list[str]:
    from transformers import AutoTokenizer

    model_dir, adapters = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_tiny(model_dir)
    if adapter is not None:
        model = lorakit.PeftModel.from_pretrained(model, adapters[adapter])
    return [_greedy(model, tokenizer, p) for p in PROMPTS]


def _cli_generate(setup, capsys, *extra: str) -> list[dict]:
    model_dir, _ = setup
    argv = ["generate", "--model", model_dir, "--max-new-tokens", "12", "--json", *extra]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_generate_with_one_adapter_matches_in_process_generation(setup, capsys):
    rows = _cli_generate(setup, capsys, "--adapter", setup[1]["a"])
    assert [r["prompt"] for r in rows] == PROMPTS and {r["adapter"] for r in rows} == {"default"}
    assert [r["completion"] for r in rows] == _expected(setup, "a")
    assert _expected(setup, "a") != _expected(setup, None), "the adapter must change the outputs for this test"


def test_generate_mixed_batch_routes_each_prompt_to_its_adapter(setup, capsys):
    _, adapters = setup
    rows = _cli_generate(
        setup, capsys, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
        "--prompt-adapter", "a", "--prompt-adapter", "b", "--prompt-adapter", "__base__",
    )  # fmt: skip
    assert [r["adapter"] for r in rows] == ["a", "b", "__base__"]
    want = [_expected(setup, "a")[0], _expected(setup, "b")[1], _expected(setup, None)[2]]
    assert [r["completion"] for r in rows] == want
    assert len({_expected(setup, n)[1] for n in ("a", "b", None)}) == 3, "adapters must disagree for this test"


def test_generate_rejects_unknown_prompt_adapter(setup, capsys):
    argv = [
        "generate",
        "--model",
        setup[0],
        "--adapter",
        f"a={setup[1]['a']}",
        "--prompt",
        "x",
        "--prompt-adapter",
        "c",
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "unknown adapters ['c']" in err and "['a']" in err


def test_merge_saves_a_standalone_model_that_reloads_with_the_adapter_outputs(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapters = setup
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--model", model_dir, "--adapter", adapters["a"], "--out", out], capsys)
    assert code == 0, err
    assert "saved a standalone float32 model" in stdout and "both in float32: max |logit diff|" in stdout
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    reference = lorakit.PeftModel.from_pretrained(load_tiny(model_dir), adapters["a"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=1e-5)
    assert _greedy(merged, tokenizer, PROMPTS[0]) == _expected(setup, "a")[0]
    # a second merge into the same folder is refused unless --overwrite
    code, _, err = run_cli(["merge", "--model", model_dir, "--adapter", adapters["b"], "--out", out], capsys)
    assert code == 2 and "is not empty" in err and "model.safetensors" in err
    argv = ["merge", "--model", model_dir, "--adapter", adapters["b"], "--out", out, "--overwrite"]
    assert run_cli(argv, capsys)[0] == 0


def test_merge_writes_ordinary_file_modes(setup, tmp_path, capsys):
    """transformers leaves model.safetensors at 0600; every merged file gets 0666 minus the umask, like the rest."""
    model_dir, adapters = setup
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(
            ["merge", "--model", model_dir, "--adapter", adapters["a"], "--out", tmp_path / "m"], capsys
        )
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_merge_says_what_it_compared_in_bf16(setup, tmp_path, capsys):
    """A bf16 base is merged and saved in bf16: the report names that dtype and the difference measured in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapters = setup
    bf16_dir = tmp_path / "bf16"
    load_tiny(model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(bf16_dir)
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--model", bf16_dir, "--adapter", adapters["a"], "--out", out], capsys)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    match = re.search(r"standalone (\w+) model .* both in (\w+): max \|logit diff\| ([0-9.e+-]+) \(allowed", stdout)
    assert match is not None, stdout
    assert match.group(1) == match.group(2) == "bfloat16"
    assert float(match.group(3)) > 0, "bf16 rounding makes merged and unmerged logits differ"
