"""save_pretrained is one transaction per adapter (issue 14 item 1): a process killed at any instant leaves the whole
old adapter or the whole new one, a reader never gets a mixed pair, and the loader refuses files that do not belong
together.

Kills are real: a forked child runs the save and ``os._exit``s at the k-th step of ``io.transaction`` (every
write, fsync, unlink and rename), so no ``finally`` or ``except`` runs, as under SIGKILL; further tests SIGKILL child
processes at random instants and run two savers at once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from txn_cases import ADAPTER_FILES, load_version, outputs, raw_pair, same_pair, save, saved_pair, which

import lorakit
from lorakit.io import transaction
from models import BUILDERS

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
TESTS = Path(__file__).resolve().parent


def _steps(old: str, new: str, tmp_path: Path) -> list[str]:
    folder = tmp_path / "steps"
    save(old, folder)
    seen: list[str] = []
    transaction.FAULT_HOOK = seen.append
    try:
        save(new, folder)
    finally:
        transaction.FAULT_HOOK = None
    return seen


def _killed_save(name: str, folder: Path, at: int) -> None:
    """Save version ``name`` in a forked child that dies (os._exit, nothing cleaned up) before step ``at``."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            count = iter(range(at + 1))

            def hook(step: str) -> None:
                if next(count) == at:
                    os._exit(0)

            transaction.FAULT_HOOK = hook
            save(name, folder)
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child finished the save instead of dying at the step"


def _peft_view(folder: Path) -> str | None:
    """The version peft.PeftModel.from_pretrained loads from the folder as it is, None when it refuses."""
    try:
        model = peft.PeftModel.from_pretrained(BUILDERS["mlp"](), folder)
    except Exception:
        return None
    return which(outputs(model), rtol=1e-5)


@pytest.mark.parametrize(("old", "new"), [("A", "B"), ("B", "A"), ("A", "C")])
def test_a_kill_at_every_step_leaves_the_old_or_the_new_adapter(tmp_path, old, new):
    steps = _steps(old, new, tmp_path)
    commit = steps.index("commit")
    pairs = {name: saved_pair(name, tmp_path / f"ref-{name}") for name in (old, new)}
    for at in range(len(steps)):
        folder = tmp_path / f"kill-{at}"
        save(old, folder)
        _killed_save(new, folder, at)
        config, weights, names = raw_pair(folder)
        assert len(names) <= 1, f"{steps[at]}: two weights files {names}"
        journals = [p for p in folder.iterdir() if p.name.startswith(".lorakit-commit-")]
        if weights is None:  # only while a committed save is being moved into place
            assert journals and at > commit, steps[at]
        else:  # what any reader finds is a whole pair, old or new
            assert same_pair((config, weights), pairs[old]) or same_pair((config, weights), pairs[new]), steps[at]
        assert _peft_view(folder) in ({old, new} if weights is not None else {None}), steps[at]
        # lorakit finishes a committed save before reading: the folder holds the old adapter up to the commit
        assert load_version(folder) == (old if at <= commit else new), steps[at]
        assert not [p for p in folder.iterdir() if p.name.startswith(".lorakit-commit-")]
        save("C", folder)  # the next save also removes what the killed one left
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert load_version(folder) == "C"


def test_the_step_list_covers_every_rename_fsync_and_unlink(tmp_path):
    steps = _steps("B", "A", tmp_path)  # .bin -> safetensors: the stale .bin goes in the same transaction
    assert steps[:2] == ["mkdir:staging", "write:adapter_config.json"]
    for step in ("fsync:adapter_config.json", "fsync:adapter_model.safetensors", "fsync:staging", "commit"):
        assert step in steps
    after = steps[steps.index("commit") :]
    assert after.index("unlink:adapter_model.bin") < after.index("rename:adapter_config.json")
    assert after.index("rename:adapter_config.json") < after.index("rename:adapter_model.safetensors")
    assert after[-1] == "rmdir:journal"


def test_an_exception_during_the_save_leaves_the_folder_byte_for_byte(tmp_path):
    save("A", tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(step: str) -> None:
        if step == "fsync:staging":
            raise OSError("disk full")

    transaction.FAULT_HOOK = fail
    try:
        with pytest.raises(OSError, match="disk full"):
            save("B", tmp_path)
    finally:
        transaction.FAULT_HOOK = None
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_leftovers_of_interrupted_saves_are_removed_by_the_next_save(tmp_path):
    save("A", tmp_path)
    (tmp_path / ".adapter_model.safetensors.k2j4.tmp").write_bytes(b"half")  # per-file writes of older versions
    (tmp_path / ".adapter_config.json.x9.tmp").write_text("{")
    staging = tmp_path / ".lorakit-save-abc.tmp"
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    (tmp_path / ".notes.tmp").write_text("mine")  # not a save's file: kept
    (tmp_path / "other").mkdir()  # another adapter's folder: kept
    save("B", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".notes.tmp",
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
        "other",
    ]
    assert load_version(tmp_path) == "B"


def test_the_loader_refuses_a_config_that_does_not_belong_to_the_weights(tmp_path):
    for name in ("A", "B"):
        save(name, tmp_path / name)
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "A", mixed)
    shutil.copy(tmp_path / "B" / "adapter_config.json", mixed / "adapter_config.json")  # same rank, other alpha
    with pytest.raises(ValueError, match=r"do not belong together.*lora_alpha \(weights: 4, config: 8\)"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), mixed)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(ValueError, match="do not belong together"):
        model.load_adapter(mixed, "second")
    assert list(model.peft_config) == ["default"]
    # .bin weights name their config as well
    mixed_bin = tmp_path / "mixed_bin"
    shutil.copytree(tmp_path / "B", mixed_bin)
    shutil.copy(tmp_path / "A" / "adapter_config.json", mixed_bin / "adapter_config.json")
    with pytest.raises(ValueError, match=r"adapter_model\.bin and .*adapter_config\.json do not belong together"):
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), mixed_bin)


def test_fields_that_do_not_change_the_weights_meaning_may_be_edited(tmp_path):
    save("A", tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": "/local/copy"}))
    assert load_version(tmp_path) == "A"
    # a config given on purpose is applied without the check
    config = lorakit.LoraConfig.from_pretrained(tmp_path)
    config.lora_alpha = 8
    model = lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path, config=config)
    assert model.peft_config["default"].lora_alpha == 8


def test_a_folder_written_by_peft_is_not_checked_and_loads(tmp_path):
    save("A", tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as peft writes it
    assert load_version(tmp_path) == "A"


def test_lorakit_saves_load_in_peft_without_warnings(tmp_path):
    for name in ("A", "B"):
        save(name, tmp_path / name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(BUILDERS["mlp"](), tmp_path / name)
        assert [str(w.message) for w in caught] == []
        assert which(outputs(model), rtol=1e-5) == name


def _child(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    code = "import sys, txn_cases as t; from pathlib import Path\n" + script
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


LOOP = """
folder = Path(sys.argv[1])
for i in range(10**6):
    t.save("AB"[i % 2], folder)
    print(i, flush=True)
"""


def test_sigkill_at_random_instants_leaves_a_whole_adapter(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "adapter"
    for _ in range(3):
        child = _child(LOOP, str(folder))
        for _ in range(2):  # a couple of complete saves, then kill somewhere in the following ones
            assert child.stdout.readline()
        time.sleep(rng.uniform(0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert load_version(folder) in {"A", "B"}
        config, _, names = raw_pair(folder)
        assert len(names) == 1
        assert json.loads(saved_config_text(folder, names[0])) == config  # whole pair after the loader's recovery


def saved_config_text(folder: Path, weights_name: str) -> str:
    if weights_name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(folder / weights_name), "pt") as fh:
            return fh.metadata()["lorakit.adapter_config"]
    return torch.load(folder / weights_name, weights_only=True).lorakit_metadata["lorakit.adapter_config"]


SAVER = """
folder = Path(sys.argv[1])
for i in range(int(sys.argv[3])):
    t.save(sys.argv[2], folder)
print("done", flush=True)
"""


def test_two_concurrent_savers_and_a_reader(tmp_path):
    folder = tmp_path / "adapter"
    save("C", folder)
    savers = [_child(SAVER, str(folder), name, "25") for name in ("A", "B")]
    seen = set()
    while any(s.poll() is None for s in savers):
        seen.add(load_version(folder))  # every read is a whole version, never an error or a mix
    assert [s.stdout.read() for s in savers] == ["done\n", "done\n"]
    assert load_version(folder) in {"A", "B"}
    assert {p.name for p in folder.iterdir()} <= ADAPTER_FILES
    assert len([p for p in folder.iterdir() if p.name.startswith("adapter_model")]) == 1
    assert seen <= {"A", "B", "C"}


def test_a_kill_during_the_first_save_leaves_nothing_or_the_whole_adapter(tmp_path):
    seen: list[str] = []
    transaction.FAULT_HOOK = seen.append
    try:
        save("A", tmp_path / "steps")
    finally:
        transaction.FAULT_HOOK = None
    assert "rename:README.md" in seen  # a new folder gets a card, moved in last
    commit = seen.index("commit")
    for at in range(len(seen)):
        folder = tmp_path / f"kill-{at}"
        _killed_save("A", folder, at)
        if at <= commit:
            assert not {p.name for p in folder.iterdir()} & ADAPTER_FILES, seen[at]
            with pytest.raises(FileNotFoundError, match=r"No adapter_config\.json"):
                load_version(folder)
        else:
            assert load_version(folder) == "A", seen[at]
            assert {p.name for p in folder.iterdir()} == ADAPTER_FILES - {"adapter_model.bin"}
