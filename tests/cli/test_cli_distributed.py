"""``lorakit train`` on 2 CPU processes (gloo) under torch's launcher (issue 22): DDP (through ``--nproc 2``) and
``--fsdp`` (through ``python -m torch.distributed.run``) give the adapter of one process on the same global
batches; SIGTERM saves a checkpoint that resumes on 2 ranks or on 1 to the uninterrupted run's adapter; rank 0
alone prints and writes; bad launches end every rank with one line. Real processes; the tiny Llama of cli_helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_helpers import load_tiny, run_cli, task_rows, tiny_lm_dir, write_jsonl
from safetensors.torch import load_file

if sys.platform == "win32" or not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs POSIX signals and torch.distributed with gloo", allow_module_level=True)

STEPS = 60
RANK_MAIN = Path(__file__).with_name("dist_rank_main.py")
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ERROR = "lorakit train: error:"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return tiny_lm_dir(root / "model"), write_jsonl(root / "train.jsonl", task_rows(40))


def _argv(files, out, *extra) -> list[str]:
    model, data = files
    return [
        "train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
        "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0.1", "--eval-fraction", "0.2", "--plot", "none",
        "--dropout", "0", "--target-modules", "q_proj,v_proj", "--threads", "1", "--progress", "lines", *extra,
    ]  # fmt: skip


def _lorakit(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def _torchrun(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, str(RANK_MAIN), *argv], cwd=cwd, env=ENV | env, capture_output=True, text=True, timeout=300
    )


def _assert_same_adapter(got: Path, want: Path) -> None:
    a, b = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def _losses(out: Path) -> list:
    return json.loads((out / "train_metrics.json").read_text())["losses"]


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    """One process, same global batches: the reference."""
    from lorakit.cli.main import main

    out = tmp_path_factory.mktemp("single") / "out"
    assert main(_argv(files, out, "--progress", "none")) == 0
    b = load_file(out / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in b.items() if "lora_B" in k) > 1e-3, "training must move lora_B"
    return out


@pytest.fixture(scope="module")
def ddp(files, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    return _lorakit(_argv(files, "out", "--nproc", "2"), cwd), cwd / "out"


def test_ddp_through_nproc_equals_one_process(single, ddp):
    done, out = ddp
    assert done.returncode == 0, done.stderr
    _assert_same_adapter(out, single)
    assert [s for s, _ in _losses(out)] == list(range(1, STEPS + 1))
    assert [v for _, v in _losses(out)] == pytest.approx([v for _, v in _losses(single)], abs=1e-6)
    # rank 0 alone prints: the header, every progress line and the result once
    assert done.stdout.count("ranks: 2 processes, DDP over gloo") == 1, done.stdout
    assert "each reads 2 of every step's 4" in done.stdout
    assert done.stdout.count("before: held-out loss") == 1 and done.stdout.count("saved adapter to") == 1
    for step in range(STEPS // 10, STEPS + 1, STEPS // 10):
        assert len(re.findall(rf"step +{step}/{STEPS} ", done.stderr)) == 1, done.stderr


def test_fsdp_equals_one_process_and_only_rank_0_writes(single, files, tmp_path):
    done = _torchrun(_argv(files, "out", "--fsdp", "--eval-every", "20"), tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_same_adapter(tmp_path / "rank0" / "out", single)
    metrics = json.loads((tmp_path / "rank0" / "out" / "train_metrics.json").read_text())
    assert [s for s, _ in metrics["held_out_losses"]] == [0, 20, 40, 60]  # evaluated with every rank taking part
    assert list((tmp_path / "rank1").iterdir()) == [], "rank 1 must not write a file"
    assert done.stdout.count("FSDP2 over gloo") == 1 and done.stdout.count("saved adapter to") == 1


def _interrupt(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Start ``lorakit ARGV`` (2 ranks), SIGTERM the launcher once rank 0 reports the first tenth of the run."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *argv], cwd=cwd, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    seen = []
    for line in process.stderr:
        seen.append(line)
        if re.search(rf"step +{STEPS // 10}/{STEPS} ", line):
            process.send_signal(signal.SIGTERM)
            break
    _, rest = process.communicate(timeout=300)
    return process.returncode, "".join(seen) + rest


def test_sigterm_checkpoint_resumes_on_two_ranks_and_on_one(single, ddp, files, tmp_path, capsys):
    """Under --fsdp, so that the optimizer state is gathered from shards to save and sharded again to resume."""
    code, stderr = _interrupt(_argv(files, "out", "--nproc", "2", "--fsdp"), tmp_path)
    out = tmp_path / "out"
    assert code == 128 + signal.SIGTERM, stderr
    assert stderr.count("interrupted at step") == 1 and stderr.count("SIGTERM: finishing this step") == 1, stderr
    assert not (out / "adapter_config.json").exists()
    payload = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    stopped_at = payload["state"]["step"]
    assert STEPS // 10 <= stopped_at < STEPS, "the signal must arrive during training"
    assert len(payload["rng_ranks"]) == 2  # every rank's RNG: rank 1 draws its own dropout masks
    assert not torch.equal(payload["rng_ranks"][0]["torch"], payload["rng_ranks"][1]["torch"])
    shutil.copytree(out, tmp_path / "out1")

    done = _lorakit([*_argv(files, "out", "--nproc", "2", "--fsdp"), "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"at step {stopped_at}/{STEPS}") == 1
    _assert_same_adapter(out, ddp[1])
    assert [v for _, v in _losses(out)] == pytest.approx([v for _, v in _losses(ddp[1])], abs=1e-6)
    assert not (out / "checkpoint").exists()

    # the data position is global: the same checkpoint resumes in one process (no FSDP), to the same adapter
    code, _, stderr = run_cli([*_argv(files, tmp_path / "out1", "--progress", "none"), "--resume"], capsys)
    assert code == 0, stderr
    _assert_same_adapter(tmp_path / "out1", single)


def test_mismatched_options_end_every_rank_with_one_line(files, tmp_path):
    done = _torchrun(_argv(files, "out"), tmp_path, LORAKIT_TEST_RANK1_ARGS="--lr 0.02")
    errors = [line for line in done.stderr.splitlines() if line.startswith(ERROR)]
    assert done.returncode != 0 and len(errors) == 2, done.stderr
    assert all("rank 1 differs from rank 0 in --lr 0.01 vs 0.02" in line for line in errors), errors


def test_unwritable_out_on_rank_0_ends_every_rank(files, tmp_path):
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "blocker").write_text("a file where --out wants a folder")
    done = _torchrun(_argv(files, "blocker/out"), tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith(ERROR)]
    assert done.returncode != 0 and len(errors) == 2, done.stderr
    assert all("'blocker/out' is not writable" in line for line in errors), errors
    assert sum("(rank 0, checking --out)" in line for line in errors) == 1
    assert list((tmp_path / "rank1").iterdir()) == [], "rank 1 neither checks nor creates --out"


@pytest.mark.parametrize(("batch_size", "grad_accum", "world"), [(4, 1, 2), (2, 2, 2), (4, 2, 2), (6, 1, 3)])
def test_rank_shards_average_to_the_one_process_gradient(files, batch_size, grad_accum, world):
    """The ranks' weighted shard losses, averaged as DDP averages gradients, give one process's gradient."""
    from lorakit.cli.data import batch_at, encode_all, read_examples
    from lorakit.cli.loading import load_tokenizer
    from lorakit.cli.shards import step_shards

    model_dir, data = files
    tokenizer = load_tokenizer(model_dir, "tiny")
    rows = encode_all(read_examples(str(data)), tokenizer, 64, "training")
    model = load_tiny(model_dir)

    def grads(pairs) -> list[torch.Tensor]:
        model.zero_grad()
        for batch, weight in pairs:
            (model(**batch).loss * weight).backward()
        return [p.grad.clone() for p in model.parameters()]

    step, pad = 3, tokenizer.pad_token_id
    whole = [batch_at(rows, step * grad_accum + m, batch_size, 0, pad) for m in range(grad_accum)]
    want = grads([(batch, 1 / grad_accum) for batch in whole])
    split = {"batch_size": batch_size, "grad_accum": grad_accum, "seed": 0, "pad_id": pad, "world_size": world}
    shards = [s for rank in range(world) for s in step_shards(rows, step, rank=rank, **split)]
    assert sum(len(s.batch["input_ids"]) for s in shards) == batch_size * grad_accum
    got = grads([(s.batch, s.weight / world) for s in shards])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_steps_that_cannot_be_split_evenly_are_refused():
    from lorakit.cli.errors import CliError
    from lorakit.cli.shards import check_split

    check_split(4, 1, 40, 2)
    check_split(3, 2, 40, 2)
    with pytest.raises(CliError, match=r"--batch-size 3 x --grad-accum 1 = 3 sequences per step cannot be split"):
        check_split(3, 1, 40, 2)


def _launched_as(monkeypatch, rank: int = 0, size: int = 2) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": size}.items():
        monkeypatch.setenv(name, str(value))


def test_launch_refusals_before_joining_the_process_group(files, tmp_path, monkeypatch):
    """Checked before init_process_group, so these end at once (no peer to wait for)."""
    from lorakit.cli.errors import CliError
    from lorakit.cli.main import build_parser
    from lorakit.cli.ranks import start

    def args(*extra):
        return build_parser().parse_args(_argv(files, tmp_path / "out", *extra))

    with pytest.raises(CliError, match="--fsdp shards the model over several processes: add --nproc N"):
        start(args("--fsdp"))
    _launched_as(monkeypatch)
    with pytest.raises(CliError, match="--nproc 3 inside a torchrun launch of 2 processes per machine"):
        start(args("--nproc", "3"))
    with pytest.raises(CliError, match=r"--device 'cuda:1': under torchrun every rank takes its own device"):
        start(args("--device", "cuda:1"))
    assert not dist.is_initialized()


def test_a_broken_collective_ends_the_rank_with_one_line():
    from lorakit.cli.ranks import RankFailure, World, failures_as_one_line

    world = World(rank=1, size=2, backend="gloo")
    lost = r"rank 1/2: lost contact with the other ranks \(.*Connection closed by peer"
    with pytest.raises(RankFailure, match=lost), failures_as_one_line(world):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23201")
    with pytest.raises(ZeroDivisionError), failures_as_one_line(world):
        1 / 0  # noqa: B018  (not a collective: passed on as it is)
    assert RankFailure.exit_code == 1
