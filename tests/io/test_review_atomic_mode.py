"""Saved adapter files get the permissions of an ordinary new file (0666 minus the umask), not the 0600 of a
private temporary file, so other users and serving processes can read them."""

from __future__ import annotations

import os
import stat

import lorakit
from lorakit.io.atomic import atomic_write_text
from models import BUILDERS


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_adapter_files_have_umask_permissions(tmp_path):
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0"], r=2))
    model.save_pretrained(tmp_path)
    expected = 0o666 & ~_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert modes == dict.fromkeys(modes, expected)


def test_atomic_write_keeps_existing_file_mode(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
