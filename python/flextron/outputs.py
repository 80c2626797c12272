"""Writing files users own (DESIGN.md section 7).

One rule for every command that writes: it never replaces or deletes what it did not create
unless the user says ``overwrite``; the source of a command is never its destination; a
directory output (convert, export) appears whole, written to a temporary sibling and renamed
into place, so a killed run leaves the old output or the new one, never a mix; and a
directory being written is locked by one process (an advisory ``flock``, released by the
kernel when the process dies, so a stale lock is taken over by itself; the lock file is
removed on release); every file is written atomically (a temporary sibling, flushed, then
renamed over the target).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


class OutputError(FileExistsError):
    """An output would replace something the user has, or is being written by another process."""


def umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_permissions(path: Path, directory: bool = False) -> None:
    """Give a file made by ``tempfile`` (mode 0600) the permissions the user's umask asks for."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def check_not_source(out: Path, *sources: Path, flag: str = "--out") -> None:
    """Refuse an output that is a source, lies inside one, or holds one."""
    for source in sources:
        if _inside(Path(out), Path(source)) or _inside(Path(source), Path(out)):
            raise OutputError(f"{flag} {out} overlaps the source {source}: write somewhere else")


def check_free(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{flag} {out} already exists and is not empty: pass --overwrite to replace it")


def check_files_free(paths: Sequence[Path], overwrite: bool, flag: str = "--out") -> None:
    """Refuse to replace existing result files unless ``overwrite``."""
    for path in paths:
        if Path(path).exists() and not overwrite:
            raise OutputError(f"{flag}: {path} already exists: pass --overwrite to replace it")


class DirectoryLock:
    """An exclusive lock on ``lock_file`` for one writer; the holder's PID is in the file."""

    def __init__(self, lock_file: Path, what: str) -> None:
        self.lock_file, self.what = Path(lock_file), what
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"{self.what} is being written by another process (PID {holder})") from None
            if self._is_current(fd):
                break
            os.close(fd)  # locked a file its holder removed on release: open the path again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.lock_file.unlink(missing_ok=True)  # while still held: no lock files left behind
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _remove_stale_partials(out: Path) -> None:
    """Temporary siblings of ``out`` left by killed runs (we hold its lock, so none is live)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: str | Path, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out``
    (which must be free unless ``overwrite``), on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out.parent / f".{out.name}.lock", f"{flag} {out}"):
        check_free(out, overwrite, flag)
        _remove_stale_partials(out)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        staging.mkdir()  # the umask applies
        try:
            yield staging
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                staging.rename(out)
                shutil.rmtree(old)
            else:
                staging.rename(out)
        except OSError as e:  # e.g. a full disk: say that the old output is intact
            shutil.rmtree(staging, ignore_errors=True)
            raise OSError(f"{flag} {out} was not written (what it held is unchanged): {e}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write into; on success it is flushed to disk, given
    the umask's permissions and renamed over ``path``; on failure it is removed. A failed
    write is an OSError naming ``path`` (safetensors reports a full disk as SafetensorError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        user_permissions(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OSError(f"could not write {path}: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a killed process leaves the old file)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    with atomic_file(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
