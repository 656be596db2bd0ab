"""qlora_ext/_files.py: files and folders are written whole or not at all, with the umask's mode."""
import os

import pytest

from qlora_ext._files import atomic_write, atomic_write_folder, atomic_write_text


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
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        atomic_write_folder(str(tmp_path / "model"), lambda d: open(os.path.join(d, "w.bin"), "wb").close())
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o750


def test_a_folder_replaces_only_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    atomic_write_folder(str(tmp_path / "empty"), lambda d: open(os.path.join(d, "config.json"), "w").close())
    assert os.listdir(tmp_path / "empty") == ["config.json"]
    with pytest.raises(OSError):
        atomic_write_folder(str(tmp_path / "empty"), lambda d: open(os.path.join(d, "other"), "w").close())
    assert os.listdir(tmp_path / "empty") == ["config.json"] and sorted(os.listdir(tmp_path)) == ["empty"]
