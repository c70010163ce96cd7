"""``lorakit train`` end to end on a tiny model: files written, adapter loads in peft, Ctrl-C + --resume."""

from __future__ import annotations

import json
import signal
import threading

import peft
import pytest
import torch
from cli_helpers import load_tiny, run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl
from safetensors.torch import load_file

import lorakit
from lorakit.cli import progress


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", task_rows(40))


def _logits(model, text="Copy cat3: cat3"):
    ids = torch.tensor([[1, *range(10, 10 + len(text))]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_train_writes_a_peft_adapter_plot_and_metrics(model_dir, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = train_argv(model_dir, data, out, "--r", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj")
    argv[argv.index("--plot") + 1] = str(tmp_path / "curve.png")
    code, stdout, stderr = run_cli([*argv, "--eval-generate", "-1", "--eval-every", "2"], capsys)
    assert code == 0, stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint").exists()
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(model_dir)
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), "training must move B off zero"
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    assert [s for s, _ in metrics["held_out_losses"]] == [0, 2, 4]
    assert metrics["after"]["exact_match"]["total"] == 8  # 20% of 40 held out, all prompt/completion
    assert "before: held-out loss" in stdout and "after:  held-out loss" in stdout
    # the adapter loads in peft and in lorakit with the same outputs
    ours = lorakit.PeftModel.from_pretrained(load_tiny(model_dir), out)
    ref = peft.PeftModel.from_pretrained(load_tiny(model_dir), out)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=0)
    assert (_logits(ours) - _logits(load_tiny(model_dir))).abs().max() > 1e-4


def test_lora_flags_reach_the_saved_config(model_dir, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    flags = [
        "--target-modules", "q_proj,v_proj,o_proj", "--r", "4", "--alpha", "16", "--dora", "--rslora",
        "--rank-pattern", "v_proj=2", "--alpha-pattern", '{"o_proj": 3}', "--dropout", "0.1",
        "--layers-to-transform", "1",
    ]  # fmt: skip
    code, _, stderr = run_cli(train_argv(model_dir, data, out, *flags), capsys)
    assert code == 0, stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and config["lora_dropout"] == 0.1
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"o_proj": 3}
    assert config["layers_to_transform"] == 1
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(".layers.1." in k for k in tensors)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape[0] == 2
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in tensors
    ours = lorakit.PeftModel.from_pretrained(load_tiny(model_dir), out)
    ref = peft.PeftModel.from_pretrained(load_tiny(model_dir), out)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=0)


def test_every_lora_config_field_has_a_flag_or_a_reason():
    import dataclasses

    from lorakit.cli.lora_options import NOT_ON_COMMAND_LINE, flag_fields

    fields = {f.name for f in dataclasses.fields(lorakit.LoraConfig)}
    assert {f.name for f in flag_fields()} | set(NOT_ON_COMMAND_LINE) == fields
    assert set(NOT_ON_COMMAND_LINE) <= fields, "a skipped field no longer exists"


def test_flags_parse_into_lora_config():
    from lorakit.cli.lora_options import lora_config_from_args
    from lorakit.cli.main import build_parser

    argv = ["train", "--model", "m", "--data", "d", "--out", "o", "--init", "pissa_niter_4", "--target-modules",
            "re:.*\\.(q|v)_proj", "--bias", "lora_only", "--modules-to-save", "lm_head",
            "--trainable-token-indices", "[1, 2]", "--no-rslora", "--alpha", "2.5"]  # fmt: skip
    config = lora_config_from_args(build_parser().parse_args(argv))
    assert config.init_lora_weights == "pissa_niter_4" and config.target_modules == ".*\\.(q|v)_proj"
    assert (config.bias, config.modules_to_save, config.trainable_token_indices) == ("lora_only", ["lm_head"], [1, 2])
    assert config.use_rslora is False and config.lora_alpha == 2.5
    assert lora_config_from_args(build_parser().parse_args([*argv[:7], "--init", "false"])).init_lora_weights is False
    eva = lora_config_from_args(build_parser().parse_args([*argv[:7], "--init", "eva", "--eva-config", '{"rho": 1.5}']))
    assert eva.init_lora_weights == "eva" and eva.eva_config.rho == 1.5


class _CtrlCAtStep2(progress.NoProgress):
    """A progress display that presses Ctrl-C (a real SIGINT) after step 2."""

    def update(self, step, loss, avg_loss, tokens_per_s):
        if step == 2:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    model_dir, data, tmp_path, capsys, monkeypatch
):
    extra = ("--target-modules", "q_proj,v_proj", "--dropout", "0.2", "--max-steps", "5")
    straight = tmp_path / "straight"
    assert run_cli(train_argv(model_dir, data, straight, *extra), capsys)[0] == 0

    stopped = tmp_path / "stopped"
    monkeypatch.setitem(progress.DISPLAYS, "none", _CtrlCAtStep2)
    code, _, stderr = run_cli(train_argv(model_dir, data, stopped, *extra), capsys)
    assert code == 130
    assert "interrupted at step 2" in stderr and "--resume" in stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {
        p.name for p in (stopped / "checkpoint").iterdir()
    }
    assert not (stopped / "adapter_config.json").exists()
    # without --resume or --overwrite the folder is refused
    code, _, stderr = run_cli(train_argv(model_dir, data, stopped, *extra), capsys)
    assert code == 2 and "--resume" in stderr
    monkeypatch.setitem(progress.DISPLAYS, "none", progress.NoProgress)
    code, stdout, stderr = run_cli([*train_argv(model_dir, data, stopped, *extra), "--resume"], capsys)
    assert code == 0, stderr
    assert "resuming from" in stdout and "at step 2/5" in stdout
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(stopped / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    losses_a = json.loads((straight / "train_metrics.json").read_text())["losses"]
    losses_b = json.loads((stopped / "train_metrics.json").read_text())["losses"]
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] == [1, 2, 3, 4, 5]
    assert [v for _, v in losses_a] == pytest.approx([v for _, v in losses_b], abs=1e-6)


def test_resume_refuses_other_lora_options(model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setitem(progress.DISPLAYS, "none", _CtrlCAtStep2)
    assert run_cli(train_argv(model_dir, data, out, "--r", "4"), capsys)[0] == 130
    code, _, stderr = run_cli([*train_argv(model_dir, data, out, "--r", "8"), "--resume"], capsys)
    assert code == 2 and "['r']" in stderr and len(stderr.strip().splitlines()) == 1


def test_chat_and_plain_text_data_train(model_dir, tmp_path, capsys):
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(12)]  # fmt: skip
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(12)))
    for data, out in ((write_jsonl(tmp_path / "chat.jsonl", chat), "a"), (text, "b")):
        code, _stdout, stderr = run_cli(train_argv(model_dir, data, tmp_path / out), capsys)
        assert code == 0, stderr
        assert (tmp_path / out / "adapter_model.safetensors").is_file()


def test_pissa_adapter_is_saved_for_the_original_base_model(model_dir, data, tmp_path):
    """PiSSA trains on a residual base; the saved rank-2r adapter reproduces the trained model on the ORIGINAL base."""
    from lorakit.cli import train
    from lorakit.cli.main import build_parser

    out = tmp_path / "pissa"
    # on the CPU in float32: the reloads below run there (on a GPU machine --device auto would pick bf16 CUDA)
    argv = train_argv(model_dir, data, out, "--init", "pissa", "--target-modules", "q_proj", "--device", "cpu")
    args = build_parser().parse_args([str(a) for a in argv])
    outcome = train.train(args)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 16, True)
    assert not (out / "initial_adapter").exists()
    trained = _logits(outcome.model)
    for cls in (peft.PeftModel, lorakit.PeftModel):
        torch.testing.assert_close(_logits(cls.from_pretrained(load_tiny(model_dir), out)), trained, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("accum", ["1", "2"])
def test_cuda_graph_training_matches_eager(model_dir, data, tmp_path, capsys, accum):
    """--cuda-graph pads every batch to one width and replays forward + backward: the same losses and adapter as
    the eager loop (no dropout, so no random masks differ), with and without gradient accumulation."""
    adapters = {}
    for mode in ("eager", "graph"):
        out = tmp_path / mode
        extra = ["--device", "cuda", "--dropout", "0", "--grad-accum", accum, "--seed", "3"]
        argv = train_argv(model_dir, data, out, *extra, *(["--cuda-graph"] if mode == "graph" else []))
        code, _, stderr = run_cli(argv, capsys)
        assert code == 0, stderr
        metrics = json.loads((out / "train_metrics.json").read_text())
        adapters[mode] = (metrics, load_file(out / "adapter_model.safetensors"))
    (eager_metrics, eager), (graph_metrics, graph) = adapters["eager"], adapters["graph"]
    assert eager.keys() == graph.keys()
    for key in eager:
        torch.testing.assert_close(graph[key], eager[key], atol=1e-4, rtol=1e-4)
    assert graph_metrics["settings"]["cuda_graph"] and not eager_metrics["settings"]["cuda_graph"]
    assert [s for s, _ in graph_metrics["losses"]] == [s for s, _ in eager_metrics["losses"]] == [1, 2, 3, 4]
    for (_, got), (_, want) in zip(graph_metrics["losses"], eager_metrics["losses"]):
        assert got == pytest.approx(want, abs=1e-4)
