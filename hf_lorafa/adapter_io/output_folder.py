"""Writing into an output folder without losing what is there.

- `staged_files`: every file of one save is written into a staging folder inside the target, and only when all of
  them are written are they renamed into place (renames only, no more I/O). A kill or a full disk while writing
  leaves the earlier files as they were, never a new `adapter_config.json` over old weights.
- A name in the folder that is a link is replaced by the new file (the rename replaces the link itself): the
  folder's file names are ours to write, the file a link points at is not, and refusing would block every save of a
  folder whose links are harmless.
- `refuse_model_folder`: an adapter written into a folder that holds a model (`config.json` + weights) makes
  transformers attach it to every later `from_pretrained` of that folder; merged weights written there replace it.
- `exclusive_folder`: one live writer per output folder (a `flock`ed lock file holding the writer's pid).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODEL_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "*.gguf", "tf_model.h5")
LOCK_FILE = ".hf-lorafa.lock"


def atomic_write(path: Path, write) -> None:
    """Write one file through a temporary file in the same folder, then rename: never a half file, and a link at
    `path` is replaced, not written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def holds_model(folder: Path) -> bool:
    """Whether `folder` holds a model that transformers loads (a `config.json` beside model weights)."""
    return (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in MODEL_WEIGHTS)


def refuse_model_folder(folder: str | os.PathLike, argument: str) -> None:
    """Raise unless `folder` is free of model weights that are not ours."""
    folder = Path(folder)
    if holds_model(folder):
        raise ValueError(
            f"`{argument}` {str(folder)!r} holds a model (config.json and its weights); an adapter saved there would "
            "be attached by transformers to every later from_pretrained of that folder. Pass a new folder, e.g. "
            f"{str(folder.resolve()) + '-adapter'!r}."
        )


@contextmanager
def staged_files(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside `directory`; on success move its files into `directory`, else drop them all.

    An `OSError` while writing (no space, quota, read-only) ends in one message naming the folder.
    """
    directory = Path(directory)
    refuse_model_folder(directory, "output folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=".hf-lorafa-staging-"))
    except OSError as err:
        raise OSError(err.errno, f"Cannot write to {str(directory)!r} ({err.strerror or err}).") from None
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            if path.is_file():
                os.replace(path, directory / path.name)
    except OSError as err:
        raise OSError(
            err.errno,
            f"Saving to {str(directory)!r} failed ({err.strerror or err}); nothing in it was replaced. Free some "
            "space (or fix the permissions) and save again.",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def exclusive_folder(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory` for one writer; a second live one gets an error naming the folder and the holder's pid.

    The kernel drops a `flock` when its holder exits, even killed, so a lock file left by a dead run never blocks; a
    run that ends normally removes it, so the folder holds only what the run saved.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"`output_dir` {str(directory)!r} is in use by another training run (pid {holder}); both would write "
                "the same files. Wait for it to finish, stop it, or pass another output_dir."
            ) from None
        # The holder we waited on may have removed the file as it finished: a lock on that unlinked file holds nothing.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: no other run can hold this file in between
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
