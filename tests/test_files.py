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
