"""Writing files so that nothing a user saved is lost: every write goes through a temporary file in the same
folder and os.replace, so a reader (or a crash) sees the old file or the new one, never half of one."""
import os


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict = None) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
