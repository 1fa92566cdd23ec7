"""Atomic file writes: a temporary name in the target folder, then `os.replace`, so a crash leaves the old file or none."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from cifarx.errors import CifarxError


def check_writable(target: str | os.PathLike) -> None:
    """Refuse now, creating nothing, a target whose folder could not be made: before long work, not after it."""
    _check_regular(Path(target))
    folder = Path(target).absolute().parent
    existing = folder
    while not existing.exists():  # also false below a regular file: climb to what is there
        existing = existing.parent
    if not existing.is_dir():
        raise CifarxError(f"cannot write to {folder}: {existing} is not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:  # root passes os.access on a read-only mount too
        raise CifarxError(f"cannot write to {folder}: read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CifarxError(f"cannot write to {folder}: permission denied")


def _check_regular(target: Path) -> None:
    """os.replace would swap a device, FIFO, socket or folder at `target` for a plain file: refuse them."""
    try:
        mode = target.stat().st_mode  # through a symlink: what it points to is what would be replaced
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as error:
        raise CifarxError(f"cannot write to {target}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        raise CifarxError(f"cannot write {target}: it is {kind}, not a regular file")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success move it over `target`, on any failure remove it.

    The temporary file stays locked (flock) while it is written, so the next write of the same target can tell the
    temporary files of killed writers (unlocked: removed) from those of live ones (locked: left alone)."""
    target = Path(target)
    _check_regular(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:
        raise CifarxError(f"cannot write to {target.parent}: {error.strerror or error}") from None
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CifarxError(f"could not write {target}: {error.strerror or error}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(handle)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files a killed write of `target` left (`.NAME.XXXXXXXX.tmp`, no live writer's lock)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.tmp")
    for path in target.parent.iterdir():
        if not pattern.fullmatch(path.name):
            continue
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone already, or not ours to read
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass  # locked: a write in progress
        finally:
            os.close(handle)


def folder_locked(folder: str | os.PathLike) -> bool:
    """Whether a process holds `folder`'s flock now (a run folder: a `cifarx train` in progress)."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(handle)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and move the result into place atomically."""
    with atomic_path(target) as temporary:
        write(temporary)


def atomic_torch_save(obj, target: str | os.PathLike) -> None:
    import torch

    # Serialise in memory, then write plain bytes: torch's zip writer reports a full disk as an opaque
    # RuntimeError ("unexpected pos ..."), a plain write as the OSError it is ("No space left on device").
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(target, lambda path: path.write_bytes(buffer.getbuffer()))


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write(target, lambda path: path.write_text(text))


def atomic_write_json(target: str | os.PathLike, obj) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_savefig(figure, target: str | os.PathLike) -> None:
    atomic_write(target, lambda path: figure.savefig(path, format="png", dpi=110, bbox_inches="tight"))


def check_zip_checksums(path: str | os.PathLike) -> None:
    """Refuse a torch.save archive with a CRC mismatch: torch.load skips the CRCs, so a flipped bit would load."""
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise CifarxError(f"{path} is damaged (checksum mismatch in {damaged.split('/')[-1]})")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks: how cards, metadata and reports name a file's content."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
