"""qlora_ext/_files.py: files and folders are written whole or not at all, with the umask's mode."""
import os

import pytest

from qlora_ext._files import atomic_save_safetensors, atomic_write, atomic_write_folder, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(str(path), "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_modes_follow_the_umask(tmp_path):
    import torch

    def private_writer(path):   # as safetensors >= 0.8 writes: its own temporary file (0600), renamed
        with open(path + ".own", "w") as f:
            f.write("x")
        os.chmod(path + ".own", 0o600)
        os.replace(path + ".own", path)

    def folder(d):
        open(os.path.join(d, "w.bin"), "wb").close()
        os.mkdir(os.path.join(d, "sub"), 0o700)
        private_writer(os.path.join(d, "sub", "p.bin"))

    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        atomic_write(str(tmp_path / "p.txt"), private_writer)
        atomic_save_safetensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        atomic_write_folder(str(tmp_path / "model"), folder)
    finally:
        os.umask(old)
    for name in ("a.txt", "p.txt", "w.safetensors", "model/w.bin", "model/sub/p.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name
    for name in ("model", "model/sub"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o750, name


def test_a_folder_replaces_only_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    atomic_write_folder(str(tmp_path / "empty"), lambda d: open(os.path.join(d, "config.json"), "w").close())
    assert os.listdir(tmp_path / "empty") == ["config.json"]
    with pytest.raises(OSError):
        atomic_write_folder(str(tmp_path / "empty"), lambda d: open(os.path.join(d, "other"), "w").close())
    assert os.listdir(tmp_path / "empty") == ["config.json"] and sorted(os.listdir(tmp_path)) == ["empty"]


def test_an_overwritten_file_keeps_its_mode_and_a_folder_keeps_links_and_executables(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_text("old")
    os.chmod(path, 0o600)   # made private by its user: a new save keeps it so
    old = os.umask(0o022)
    try:
        import torch
        atomic_save_safetensors({"w": torch.zeros(2)}, str(path))
        outside = tmp_path / "outside.txt"
        outside.write_text("x")
        os.chmod(outside, 0o600)

        def folder(d):
            os.symlink(outside, os.path.join(d, "link"))   # chmod through it would open the file outside
            with open(os.path.join(d, "run.sh"), "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(os.path.join(d, "run.sh"), 0o700)

        atomic_write_folder(str(tmp_path / "model"), folder)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(outside).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "model" / "run.sh").st_mode & 0o777 == 0o755
