"""SIGTERM during ``lorakit train`` (a scheduler's or `kill`'s stop) saves a checkpoint like Ctrl-C and exits
non-zero; ``--resume`` continues from it (issue 14, item 12). A real ``python -m lorakit`` process gets the signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import run_cli, task_rows, tiny_lm_dir, train_argv, write_jsonl

STEPS = 100


def _wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    process.kill()
    raise AssertionError(f"no line with {needle!r} from the training process; it wrote: {''.join(seen)}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, capsys):
    model = tiny_lm_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(40))
    out = tmp_path / "run"
    argv = [str(a) for a in train_argv(model, data, out, "--max-steps", str(STEPS), "--threads", "1")]
    argv[argv.index("--progress") + 1] = "lines"  # a line every tenth of the run, on stderr
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *argv], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    _wait_for_line(process, f"{STEPS // 10}/{STEPS}  loss")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr and str(out / "checkpoint") in stderr, stderr
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    stopped_at = state["state"]["step"]
    assert STEPS // 10 <= stopped_at < STEPS, "the signal must arrive during training"
    assert (out / "checkpoint" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()

    argv[argv.index("--progress") + 1] = "none"
    code, stdout, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"at step {stopped_at}/{STEPS}" in stdout
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [s for s, _ in metrics["losses"]] == list(range(1, STEPS + 1))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "checkpoint").exists()
