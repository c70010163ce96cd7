"""Bad input: exactly one line on stderr, exit code 2, no traceback, and the line says what was wrong."""

from __future__ import annotations

import pytest
from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = tiny_lm_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", task_rows(12))
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n\n{"prompt": "c", "completion": " d"\n')
    keys = write_jsonl(root / "keys.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "q", "answer": "a"}])
    return {"model": model, "data": data, "bad": bad, "keys": keys, "root": root}


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_data_file(files, capsys):
    argv = train_argv(files["model"], files["root"] / "nope.jsonl", files["root"] / "o1")
    _assert_one_line_error(*run_cli(argv, capsys)[::2], "nope.jsonl", "no such file")


def test_malformed_jsonl_names_file_and_line(files, capsys):
    code, _, err = run_cli(train_argv(files["model"], files["bad"], files["root"] / "o2"), capsys)
    _assert_one_line_error(code, err, f"{files['bad']}:3", "not valid JSON")


def test_jsonl_line_with_unknown_keys(files, capsys):
    code, _, err = run_cli(train_argv(files["model"], files["keys"], files["root"] / "o3"), capsys)
    _assert_one_line_error(code, err, f"{files['keys']}:2", "'question'", "'prompt'+'completion'")


@pytest.mark.parametrize(("targets", "needles"), [("q_projj", ("q_proj",)), ("q_proj,vproj", ("'vproj'", "v_proj"))])
def test_unknown_target_module_names_the_close_ones(files, capsys, targets, needles):
    argv = train_argv(files["model"], files["data"], files["root"] / "o4", "--target-modules", targets)
    code, _, err = run_cli(argv, capsys)
    _assert_one_line_error(code, err, *needles)
    assert not (files["root"] / "o4" / "adapter_config.json").exists()


def test_model_id_not_resolvable_offline(files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = train_argv("nonexistent-org/nonexistent-model-xyz", files["data"], files["root"] / "o5")
    code, _, err = run_cli(argv, capsys)
    _assert_one_line_error(code, err, "nonexistent-org/nonexistent-model-xyz", "offline")


def test_model_path_that_does_not_exist(files, capsys):
    code, _, err = run_cli(
        train_argv(files["root"] / "no" / "such" / "model", files["data"], files["root"] / "o6"), capsys
    )
    _assert_one_line_error(code, err, "no such folder")


def test_out_dir_with_another_adapter_is_refused_unless_overwrite(files, capsys):
    out = files["root"] / "o7"
    assert run_cli(train_argv(files["model"], files["data"], out, "--r", "2"), capsys)[0] == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli(train_argv(files["model"], files["data"], out, "--r", "4"), capsys)
    _assert_one_line_error(code, err, "already holds an adapter", "r=2", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    code, _, err = run_cli([*train_argv(files["model"], files["data"], out, "--r", "4"), "--overwrite"], capsys)
    assert code == 0, err
    assert '"r": 4' in (out / "adapter_config.json").read_text()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--r", "abc"], "--r"),
        (["--bias", "some"], "--bias"),
        (["--rank-pattern", "q_proj"], "KEY=VALUE"),
        (["--r", "0"], "argument --r/--rank: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_option_values(files, capsys, extra, needle):
    code, _, err = run_cli(train_argv(files["model"], files["data"], files["root"] / "o8", *extra), capsys)
    _assert_one_line_error(code, err, needle)


def test_generate_and_inspect_errors(files, capsys):
    code, _, err = run_cli(["inspect", files["root"] / "no-adapter-here"], capsys)
    _assert_one_line_error(code, err, "no-adapter-here")
    argv = ["generate", "--model", files["model"], "--prompt", "hi", "--prompt-adapter", "x"]
    _assert_one_line_error(*run_cli(argv, capsys)[::2], "--prompt-adapter needs adapters")
    code, _, err = run_cli(["generate", "--model", files["model"]], capsys)
    _assert_one_line_error(code, err, "no prompt")


def test_cuda_graph_without_a_gpu_names_the_device(files, capsys):
    argv = train_argv(files["model"], files["data"], files["root"] / "o_graph", "--cuda-graph", "--device", "cpu")
    _assert_one_line_error(*run_cli(argv, capsys)[::2], "--cuda-graph needs a CUDA device", "cpu")


def test_generate_prompt_file_that_is_not_utf8(files, capsys):
    prompts = files["root"] / "prompts.txt"
    prompts.write_bytes("Copy caf\u00e9:\n".encode("latin-1"))
    argv = ["generate", "--model", files["model"], "--prompt-file", prompts]
    _assert_one_line_error(*run_cli(argv, capsys)[::2], "--prompt-file", "prompts.txt", "not UTF-8", "byte 8")
