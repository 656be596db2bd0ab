"""Writing files so that nothing a user saved is lost: every write goes to a temporary file of its own in the same
folder, is flushed to the disk, and then renamed over the target (os.replace), so a reader, a crash or a power
loss finds the old file or the new one, never half of one or an empty one. Folders (a model directory) likewise:
filled under a temporary name beside the target, flushed, renamed."""
import os
import shutil
import stat
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
    """The process's umask: read from /proc where it can be (setting it, even for a moment, would give a file that
    another thread creates meanwhile the mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_mode(path: str, umask: int) -> int:
    """The mode a file written to `path` should end with: an existing file's own (a user who made it private keeps
    it private), else what open() gives a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a fresh temporary file beside `path`, flushes it to the disk, renames it to
    `path`; the temporary file is removed if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # the mode open() would leave: mkstemp's 0600, or a writer's own (safetensors >= 0.8 writes through a
        # temporary file of its own, 0600), would make the saved file private to this user
        os.chmod(tmp, _new_file_mode(path, _umask()))
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
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the saved folder private
    try:
        write(tmp)
        for root, folders, files in os.walk(tmp):
            for name in folders:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:   # as atomic_write: the modes open() and mkdir() give, not a writer's 0600
                file = os.path.join(root, name)
                if os.path.islink(file):   # (chmod would change what it points to)
                    continue
                executable = os.stat(file).st_mode & 0o111
                os.chmod(file, (0o777 if executable else 0o666) & ~umask)
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_folder(root)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(parent)
