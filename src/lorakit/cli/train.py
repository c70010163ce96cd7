"""``lorakit train``: supervised LoRA fine-tuning of a causal LM on JSONL or text, saved in PEFT's format.

    lorakit train --model ID_OR_PATH --data train.jsonl --out my-adapter --r 16 --alpha 32 --target-modules all-linear

Evaluates on a held-out split before and after (loss, and exact match with --eval-generate), shows a progress bar,
writes OUT/adapter_config.json + OUT/adapter_model.safetensors, OUT/loss.png and OUT/train_metrics.json. Ctrl-C
or SIGTERM saves OUT/checkpoint/ (exit 130 / 143); the same command with --resume continues from it. --out must be
new or empty unless --overwrite (which replaces only the files above) or --resume."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import INTERRUPTED, CliError
from .lora_options import add_lora_arguments, lora_config_from_args, lora_kwargs

HELP = "fine-tune a causal LM with LoRA on a JSONL or text file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import ranges as R
    from .loading import add_model_arguments
    from .progress import DISPLAYS

    add_model_arguments(parser)
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="training data: JSONL (prompt/completion, messages, text) or text")
    io.add_argument("--eval-data", help="held-out data (same formats); default: --eval-fraction of --data")
    io.add_argument(
        "--eval-fraction", type=R.HELD_OUT_FRACTION, default=0.05, help="share of --data held out, in [0, 1)"
    )
    io.add_argument("--out", required=True, help="folder for the adapter, loss.png and train_metrics.json")
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that is not empty: replaces the adapter, checkpoint, "
        "loss.png and train_metrics.json, keeps every other file",
    )
    io.add_argument("--resume", action="store_true", help="continue from --out/checkpoint (same command as before)")
    io.add_argument("--plot", default=None, help="loss-curve PNG (default OUT/loss.png; 'none' to skip)")
    tr = parser.add_argument_group("training")
    tr.add_argument("--max-steps", type=R.COUNT, default=None, help="optimiser steps (default: --epochs over the data)")
    tr.add_argument("--epochs", type=R.EPOCHS, default=1.0, help="passes over the data when --max-steps is not given")
    tr.add_argument("--batch-size", type=R.COUNT, default=8)
    tr.add_argument("--grad-accum", type=R.COUNT, default=1, help="micro-batches per optimiser step")
    tr.add_argument(
        "--lr", type=R.LEARNING_RATE, default=2e-4, help="peak learning rate (AdamW), cosine decay to lr/10"
    )
    tr.add_argument("--warmup-ratio", type=R.RATIO, default=0.05, help="share of the steps with a linear warm-up")
    tr.add_argument("--weight-decay", type=R.NON_NEGATIVE, default=0.0)
    tr.add_argument("--max-grad-norm", type=R.NON_NEGATIVE, default=1.0, help="gradient clipping (0 = off)")
    tr.add_argument(
        "--max-length", type=R.MAX_LENGTH, default=None, help="tokens per example (default: model's, at most 1024)"
    )
    tr.add_argument("--seed", type=R.SEED, default=0)
    tr.add_argument(
        "--save-every", type=R.COUNT_OR_OFF, default=0, help="checkpoint every N steps (0 = only on Ctrl-C)"
    )
    tr.add_argument(
        "--eval-every", type=R.COUNT_OR_OFF, default=0, help="held-out loss every N steps (0 = before/after only)"
    )
    tr.add_argument(
        "--eval-generate",
        type=R.COUNT_OR_ALL,
        default=0,
        help="exact-match accuracy of greedy completions on N held-out prompt/completion examples (-1 = all)",
    )
    tr.add_argument(
        "--show-examples", type=R.COUNT_OR_OFF, default=3, help="held-out generations to print before/after"
    )
    tr.add_argument("--progress", default="auto", choices=("auto", *DISPLAYS), help="progress display")
    tr.add_argument("--threads", type=R.COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    tr.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each step's forward + backward as a CUDA graph (no host overhead per layer; CUDA only; "
        "every batch padded to the longest training sequence)",
    )
    tr.add_argument(
        "--no-fused-loss",
        dest="fused_loss",
        action="store_false",
        help="compute the training loss from the full logits (default: in chunks, lorakit.loss; same numbers, "
        "the (B, T, vocab) logits never built)",
    )
    tr.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="pad each micro-batch to its longest sequence (default: its sequences in one padding-free row with "
        "position_ids restarting per sequence, where the model keeps them apart; same losses, no compute on pads)",
    )
    ranks = parser.add_argument_group("several processes (DDP by default; see docs/distributed.md)")
    ranks.add_argument(
        "--nproc",
        type=R.COUNT,
        default=None,
        help="train on N processes of this machine (one per GPU, or CPU processes): relaunches this command "
        "through torch.distributed.run; under torchrun leave it out",
    )
    ranks.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the frozen base model over the ranks (FSDP2 fully_shard per decoder layer) instead of a whole "
        "copy per rank (DDP)",
    )
    add_lora_arguments(parser)


# ---------------------------------------------------------------- results
@dataclass
class Metrics:
    loss: float | None = None
    exact_match: Any = None  # evaluation.ExactMatch

    def summary(self) -> str:
        parts = [f"held-out loss {self.loss:.4f}" if self.loss is not None else "no held-out data"]
        if self.exact_match is not None:
            parts.append(f"exact match {self.exact_match}")
        return ", ".join(parts)


@dataclass
class TrainOutcome:
    out: Path
    completed: bool
    model: Any = None
    tokenizer: Any = None
    before: Metrics = field(default_factory=Metrics)
    after: Metrics = field(default_factory=Metrics)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    plot: Path | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str | None = None  # "Ctrl-C" or "SIGTERM" when a signal stopped the run
    exit_code: int = 0
    is_main: bool = True  # rank 0 (or the only process): the one that prints and writes files


# ---------------------------------------------------------------- output folder
def _describe_adapter(folder: Path) -> str:
    try:
        data = json.loads((folder / "adapter_config.json").read_text())
        return f"base {data.get('base_model_name_or_path')!r}, r={data.get('r')}, targets {data.get('target_modules')}"
    except (OSError, ValueError):
        return "unreadable adapter_config.json"


OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png", "train_metrics.json")
"""Files a run writes in --out (besides checkpoint/ and initial_adapter/); --overwrite replaces these only."""


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a folder holding an adapter, a checkpoint or any other file unless asked to (--overwrite / --resume);
    then make sure it is writable, before anything is loaded."""
    from .output_dir import ensure_writable, foreign_entries, listing
    from .train_state import CHECKPOINT_DIR, checkpoint_dir

    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file; give a folder.")
    if resume and overwrite:
        raise CliError("--resume and --overwrite contradict each other; pick one.")
    if not resume and not overwrite:
        if (out / "adapter_config.json").is_file():
            raise CliError(
                f"--out {str(out)!r} already holds an adapter ({_describe_adapter(out)}); pass --overwrite to replace "
                "it or choose another folder."
            )
        if checkpoint_dir(out).is_dir():
            raise CliError(
                f"--out {str(out)!r} holds the checkpoint of an interrupted run; pass --resume to continue it or "
                "--overwrite to start over."
            )
        foreign = foreign_entries(out, ours=(f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old"))
        if foreign:
            raise CliError(
                f"--out {str(out)!r} holds files lorakit train did not write ({listing(foreign)}); choose an empty "
                f"folder, or pass --overwrite to write beside them (replacing {', '.join(OUTPUTS)} if present)."
            )
    ensure_writable(out)


# ---------------------------------------------------------------- model and adapter
# ---------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything a training run works with, built once by ``prepare``."""

    args: argparse.Namespace
    out: Path
    model: Any
    tokenizer: Any
    device: Any
    train_rows: list
    eval_rows: list
    pairs: list[tuple[str, str]]
    settings: Any
    info: dict[str, Any]
    payload: dict[str, Any] | None
    world: Any  # ranks.World


def _settings(args: argparse.Namespace, n_rows: int) -> Any:
    from .data import steps_per_epoch
    from .trainer import TrainSettings

    per_epoch = steps_per_epoch(n_rows, args.batch_size)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * per_epoch / args.grad_accum))
    return TrainSettings(
        lr=args.lr,
        max_steps=max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=round(args.warmup_ratio * max_steps),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        cuda_graph=args.cuda_graph,
        fused_loss=getattr(args, "fused_loss", True),
        packing=getattr(args, "packing", True) and not args.cuda_graph,  # a CUDA graph needs one shape
    )


def _check_packing(model: Any, settings: Any) -> None:
    """Packing stays on only where the model keeps packed sequences apart (an SDPA model attends per sequence,
    ``integrations.packed_sdpa``; one small probe forward checks); else a warning naming the reason, and padding."""
    from .packing import use_packing

    reason = use_packing(model) if settings.packing else None
    if reason:
        warnings.warn(f"packing off, batches padded: {reason} (--no-packing silences this)", stacklevel=3)
        settings.packing = False


def _eval_pairs(eval_examples: list, n: int) -> list[tuple[str, str]]:
    pairs = [(e.prompt, e.completion) for e in eval_examples if e.prompt is not None and e.completion is not None]
    return pairs if n < 0 else pairs[:n]


def _check_resume(args: argparse.Namespace, payload: dict[str, Any], info: dict[str, Any]) -> None:
    run = payload["run"]
    if run["model"] != args.model:
        raise CliError(f"--resume: the checkpoint was trained on --model {run['model']!r}, not {args.model!r}.")
    given = lora_kwargs(args)
    if given and given != run["lora"]:
        diff = sorted(k for k in set(given) | set(run["lora"]) if given.get(k) != run["lora"].get(k))
        raise CliError(
            f"--resume: LoRA options {diff} differ from the checkpoint's ({ {k: run['lora'].get(k) for k in diff} }); "
            "repeat the original options or leave them out."
        )
    changed = sorted(k for k, v in info["settings"].items() if run["settings"].get(k) != v)
    if changed:
        warnings.warn(
            f"--resume: training settings {changed} differ from the checkpoint's; using the new values.", stacklevel=2
        )
    if run["data"] != info["data"]:
        warnings.warn("--resume: the training data file changed since the checkpoint was written.", stacklevel=2)


def prepare(args: argparse.Namespace, world: Any = None) -> Run:
    """Validate the inputs (cheap checks first), load the model and data, build the settings. Under torchrun rank 0
    checks --out and reads the checkpoint, and hands both results to every rank (``world.on_main``)."""
    import torch

    from .data import encode_all, read_examples, split_examples
    from .loading import load_causal_lm
    from .ranks import World
    from .shards import check_split
    from .train_state import file_fingerprint, load_checkpoint

    world = world or World()
    out = Path(args.out).expanduser()
    world.on_main(lambda: check_out_dir(out, args.overwrite, args.resume), "checking --out")
    payload = world.on_main(lambda: load_checkpoint(out), "reading the checkpoint") if args.resume else None
    examples = read_examples(args.data)
    if args.eval_data:
        train_examples, eval_examples = examples, read_examples(args.eval_data, "--eval-data")
    else:
        train_examples, eval_examples = split_examples(examples, args.eval_fraction, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args)
    max_length = args.max_length or min(1024, getattr(model.config, "max_position_embeddings", 1024) or 1024)
    train_rows = encode_all(train_examples, tokenizer, max_length, "training")
    eval_rows = encode_all(eval_examples, tokenizer, max_length, "held-out") if eval_examples else []
    settings = _settings(args, len(train_rows))
    if settings.cuda_graph and model.device.type != "cuda":
        raise CliError(f"--cuda-graph needs a CUDA device; the model is on {model.device} (--device cuda).")
    if settings.cuda_graph and world.distributed:
        raise CliError("--cuda-graph runs in one process only; leave it out under torchrun / --nproc.")
    check_split(settings.batch_size, settings.grad_accum, len(train_rows), world.size)
    _check_packing(model, settings)
    info = {
        "model": args.model,
        "lora": lora_kwargs(args) if payload is None else payload["run"]["lora"],
        "data": {"path": str(args.data), "sha256": file_fingerprint(args.data)},
        "settings": dataclasses.asdict(settings),
        "max_length": max_length,
    }
    world.check_same("data or settings", info | {"data": info["data"]["sha256"]})  # paths may differ per machine
    if payload is not None:
        _check_resume(args, payload, info)
    pairs = _eval_pairs(eval_examples, args.eval_generate)
    return Run(args, out, model, tokenizer, model.device, train_rows, eval_rows, pairs, settings, info, payload, world)


def _measure(run: Run, peft_model: Any, batches: list) -> Metrics:
    from .evaluation import exact_match, held_out_loss

    loss = held_out_loss(peft_model, batches, run.device) if batches else None
    match = exact_match(peft_model, run.tokenizer, run.pairs) if run.pairs else None
    return Metrics(loss, match)


def _print_examples(run: Run, before: Metrics, after: Metrics, stream: Any) -> None:
    n = min(run.args.show_examples, len(run.pairs))
    if n <= 0 or before.exact_match is None or after.exact_match is None:
        return
    print("held-out examples (prompt | expected | before -> after):", file=stream)
    for (prompt, want), old, new in zip(run.pairs[:n], before.exact_match.outputs, after.exact_match.outputs):
        print(f"  {prompt!r} | {want.strip()!r} | {old.strip()!r} -> {new.strip()!r}", file=stream)


def _evaluates(run: Run) -> bool:
    """Whether this rank takes part in evaluation: rank 0 alone, but every rank under FSDP2 (forward passes of a
    sharded model gather each layer from all ranks)."""
    return run.world.is_main or bool(getattr(run.args, "fsdp", False))


def _start(run: Run, stream: Any) -> tuple[Any, Any, Any, Any, list]:
    """(peft_model, parallel, optimizer, state, eval batches); restores everything from the checkpoint on --resume.
    ``parallel`` (``cli.parallel``) is the model wrapped by DDP or sharded by FSDP2 under torchrun."""
    from ..config import LoraConfig
    from ..io.functional import set_peft_model_state_dict
    from .adapter_setup import build_peft_model, changes_base
    from .data import collate, eval_batches
    from .parallel import parallelize
    from .train_state import INITIAL_DIR, TrainState, checkpoint_dir
    from .trainer import make_optimizer

    pad = run.tokenizer.pad_token_id
    fixed = {"task_type": "CAUSAL_LM", "base_model_name_or_path": run.args.model, "revision": run.args.revision}
    config = LoraConfig(**(run.info["lora"] | fixed)) if run.payload else lora_config_from_args(run.args, **fixed)
    fsdp = bool(getattr(run.args, "fsdp", False))
    if fsdp and changes_base(config):
        raise CliError(f"--fsdp with --init {config.init_lora_weights}: that init rewrites the base weights, which "
                       "--fsdp shards; train it with DDP (leave --fsdp out).")  # fmt: skip
    calibration = [collate(run.train_rows[i : i + 8], pad) for i in range(0, min(64, len(run.train_rows)), 8)]
    calibration = [{k: v.to(run.device) for k, v in b.items()} for b in calibration]
    peft_model = build_peft_model(run.model, config, calibration)
    if run.settings.fused_loss:
        peft_model.enable_fused_loss()  # training forwards only; evaluation (eval mode) still gets logits
    if changes_base(config) and run.payload is None:
        run.world.on_main(lambda: peft_model.save_pretrained(run.out / INITIAL_DIR), "saving the initial adapter")
    _header(run, peft_model, stream)  # before sharding: FSDP2 leaves each rank a part of every tensor
    if run.payload is not None:
        set_peft_model_state_dict(peft_model, run.payload["adapter"])
    parallel = parallelize(peft_model, run.world, fsdp)
    optimizer = make_optimizer(peft_model, run.settings)  # after sharding: FSDP2 turns the parameters into DTensors
    batches = eval_batches(run.eval_rows, run.settings.batch_size, pad)
    if run.payload is None:
        state = TrainState()
        before = _measure(run, peft_model, batches) if _evaluates(run) else Metrics()
        state.before = {"loss": before.loss, "exact_match": _em_dict(before.exact_match)}
        if before.loss is not None:
            state.evals.append((0, before.loss))
        return peft_model, parallel, optimizer, state, batches
    parallel.load_optimizer_state(optimizer, run.payload["optimizer"])
    state = run.payload["state"]
    print(f"resuming from {checkpoint_dir(run.out)} at step {state.step}/{run.settings.max_steps}", file=stream)
    return peft_model, parallel, optimizer, state, batches


def _em_dict(match: Any) -> dict | None:
    return None if match is None else {"correct": match.correct, "total": match.total, "outputs": match.outputs}


def _before_metrics(state: Any) -> Metrics:
    from .evaluation import ExactMatch

    em = state.before.get("exact_match")
    return Metrics(state.before.get("loss"), ExactMatch(em["correct"], em["total"], em["outputs"]) if em else None)


def _header(run: Run, peft_model: Any, stream: Any) -> None:
    from .parallel import MODES, mode_of
    from .shards import describe_split

    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config["default"]
    n_layers = sum(1 for _ in peft_model.base_model.lora_layers())
    print(
        f"model {run.args.model}: {total - trainable:,} parameters; LoRA r={config.r} alpha={config.lora_alpha} on "
        f"{n_layers} modules: {trainable:,} trainable ({100 * trainable / total:.2f}%)",
        file=stream,
    )
    s, world = run.settings, run.world
    print(
        f"data: {len(run.train_rows)} training / {len(run.eval_rows)} held-out sequences; {s.max_steps} steps of "
        f"{s.batch_size * s.grad_accum} sequences (--batch-size {s.batch_size} x --grad-accum {s.grad_accum}) on "
        f"{run.device}{describe_split(s.batch_size, s.grad_accum, world.size)}",
        file=stream,
    )
    if world.distributed:
        mode = MODES[mode_of(world, bool(getattr(run.args, "fsdp", False)))].name
        print(f"ranks: {world.size} processes, {mode} over {world.backend}; rank 0 prints and writes", file=stream)


def train(args: argparse.Namespace, stream: Any = None, on_step: Any = None) -> TrainOutcome:
    """The whole run; returns what happened (the demo reuses it). ``on_step(step)`` is called after each step.
    Under torchrun every rank runs it; rank 0 prints and writes (the other ranks' ``stream`` is discarded)."""
    from .ranks import failures_as_one_line, finish, start

    world = start(args)
    try:
        with failures_as_one_line(world), warnings.catch_warnings():
            if not world.is_main:
                warnings.simplefilter("ignore")  # rank 0 gives the same warnings once
            return _train(args, world, stream if world.is_main else io.StringIO(), on_step)
    finally:
        finish(world)


def _train(args: argparse.Namespace, world: Any, stream: Any, on_step: Any) -> TrainOutcome:
    from .evaluation import held_out_loss
    from .progress import NoProgress, make_progress
    from .rank_checkpoint import restore_rank_rng, save_on_every_rank
    from .ranks import ignore_late_stop_signals
    from .train_state import remove_checkpoint
    from .trainer import stop_on_signals, train_steps

    stream = stream or sys.stdout
    run = prepare(args, world)
    if args.overwrite:
        world.on_main(lambda: remove_checkpoint(run.out), "removing the old checkpoint")
    peft_model, parallel, optimizer, state, batches = _start(run, stream)
    before = _before_metrics(state)
    print(f"before: {before.summary()}", file=stream)
    restore_rank_rng(run.payload, world, run.args.seed, run.info["lora"].get("lora_dropout") or 0.0)
    total = run.settings.max_steps
    progress = make_progress(args.progress, total, state.step) if world.is_main else NoProgress(total, 0, stream)
    with stop_on_signals(announce=world.is_main) as stop:
        completed = train_steps(
            peft_model,
            optimizer,
            run.train_rows,
            run.settings,
            state,
            device=run.device,
            pad_id=run.tokenizer.pad_token_id,
            progress=progress,
            save=lambda: save_on_every_rank(run.out, world, parallel, peft_model, optimizer, state, run.info),
            evaluate=(lambda: held_out_loss(peft_model, batches, run.device)) if batches and _evaluates(run) else None,
            on_step=on_step,
            stop=stop,
            world=world,
            parallel=parallel,
        )
    outcome = TrainOutcome(run.out, completed, peft_model, run.tokenizer, before, pairs=run.pairs, steps=state.step)
    outcome.seconds, outcome.is_main = state.seconds, world.is_main
    if not completed:
        ignore_late_stop_signals(world)
        outcome.stopped_by, outcome.exit_code = stop.name, stop.exit_code
        return outcome
    peft_model.eval()
    outcome.after = _measure(run, peft_model, batches) if _evaluates(run) else Metrics()
    if outcome.after.loss is not None:
        state.evals.append((state.step, outcome.after.loss))
    adapter = parallel.adapter_state(peft_model)  # FSDP2: a collective, on every rank
    world.on_main(lambda: _write_files(run, state, outcome, adapter, stream), "writing the adapter")
    print(f"after:  {outcome.after.summary()}", file=stream)
    _print_examples(run, before, outcome.after, stream)
    return outcome


def _write_files(run: Run, state: Any, outcome: TrainOutcome, adapter: Any, stream: Any) -> None:
    """Rank 0: the adapter (one transaction, lorakit.io), then the checkpoint goes, then the plot and metrics."""
    from .adapter_setup import save_trained_adapter
    from .train_state import INITIAL_DIR, remove_checkpoint

    note = save_trained_adapter(peft_model=outcome.model, out=run.out, initial=run.out / INITIAL_DIR,
                                model_id=run.args.model, state_dict=adapter)  # fmt: skip
    if note:
        print(note, file=stream)
    remove_checkpoint(run.out)
    outcome.plot = _write_plot(run, state)
    _write_metrics(run, state, outcome)


def _write_plot(run: Run, state: Any) -> Path | None:
    if run.args.plot == "none":
        return None
    from .plots import plot_loss

    path = Path(run.args.plot) if run.args.plot else run.out / "loss.png"
    try:
        name = run.args.model if len(run.args.model) <= 50 else "..." + run.args.model[-47:]
        return plot_loss(path, state.losses, state.evals, title=f"LoRA fine-tuning of {name}")
    except CliError as err:
        if run.args.plot:
            raise
        warnings.warn(f"no loss plot: {err}", stacklevel=2)
        return None


def _write_metrics(run: Run, state: Any, outcome: TrainOutcome) -> None:
    data = {
        "model": run.args.model,
        "steps": state.step,
        "tokens": state.tokens,
        "train_seconds": round(state.seconds, 2),
        "tokens_per_second": round(state.tokens / state.seconds, 1) if state.seconds > 0 else None,  # real tokens
        "before": state.before,
        "after": {"loss": outcome.after.loss, "exact_match": _em_dict(outcome.after.exact_match)},
        "losses": state.losses,
        "held_out_losses": state.evals,
        "settings": run.info["settings"],
    }
    (run.out / "train_metrics.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    from .launch import relaunch, wants_relaunch

    if wants_relaunch(args):
        return relaunch(args)
    outcome = train(args)
    if not outcome.is_main:
        return 0 if outcome.completed else outcome.exit_code or INTERRUPTED
    if not outcome.completed:
        sys.stderr.write(
            f"lorakit train: interrupted at step {outcome.steps} ({outcome.stopped_by}); checkpoint saved to "
            f"{outcome.out / 'checkpoint'}. Run the same command with --resume to continue.\n"
        )
        return outcome.exit_code or INTERRUPTED
    files = ", ".join(p.name for p in sorted(outcome.out.glob("adapter_*")))
    plot = f"; loss curve {outcome.plot}" if outcome.plot else ""
    print(f"saved adapter to {outcome.out} ({files}){plot}")
    return 0
