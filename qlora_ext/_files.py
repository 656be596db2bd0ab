"""Writing files so that nothing a user saved is lost: every write goes to a temporary file of its own in the same
folder, is flushed to the disk, and then renamed over the target (os.replace), so a reader, a crash or a power
loss finds the old file or the new one, never half of one or an empty one. Folders (a model directory) likewise:
filled under a temporary name beside the target, flushed, renamed."""
import os
import shutil
import tempfile
from typing import Callable, Optional


def _fsync_folder(folder: str) -> None:
    """The rename itself reaches the disk once the folder's entry does (best effort: not every file system lets a
    folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a fresh temporary file beside `path`, flushes it to the disk, renames it to
    `path`; the temporary file is removed if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # the mode of a file open() creates: mkstemp's 0600, or a writer's own (safetensors >= 0.8 writes through a
        # temporary file of its own, 0600), would make the saved file private to this user
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_folder(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_folder) for a fresh temporary folder beside `path`, flushes its files to the disk and renames
    it to `path`. Raises OSError (and leaves nothing behind) if `path` exists and is not an empty folder: rename(2)
    replaces only an empty one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(path)) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the saved folder private
    try:
        write(tmp)
        for root, folders, files in os.walk(tmp):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~_umask())
            for name in files:   # as atomic_write: the modes of files open() creates, not a writer's 0600
                os.chmod(os.path.join(root, name), 0o666 & ~_umask())
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_folder(root)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(parent)
