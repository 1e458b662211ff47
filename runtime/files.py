"""Safe writes: every artifact goes to a temporary name first and is renamed into place, under a lock.

A folder (a bundle) is replaced by exchanging it with its finished twin in one `renameat2(RENAME_EXCHANGE)`
call, so a kill at any moment leaves either the old folder or the new one at its name, never neither.
Where the file system cannot exchange, two renames are used and the next writer puts back a folder a kill
left aside. Writers of one path are serialised by a lock file beside it (`.NAME.lock`), and each writer first
removes what a killed one left (`.NAME.*.partial`, `.NAME.old`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dtk.runtime.errors import file_error

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
FAULT_ENV = "DTK_FAULT_PAUSE"  # fault injection for tests: pause (and say so on stderr) at this point


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, clean: bool = True):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    For writers that want a file name (torch.save, onnx.save, PIL.Image.save with a format). `clean` first
    removes what a killed writer of `path` left (a scan of the folder: writers of many files turn it off)."""
    path = Path(path)
    if path.is_dir():
        raise file_error(path, "is a directory; give a file name")
    _make_parent(path)
    with locked(path):
        if clean:
            clean_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; artifacts get the usual permissions
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and _about(e, Path(tmp)):
                raise file_error(path, f"cannot write ({e.strerror or e})") from None
            raise


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True, check=None, on_wait=None):
    """Yield a temporary directory beside `path`; on success it replaces `path`, on failure it is removed.

    `check(path)`, when given, runs under the lock just before an existing `path` is replaced and may refuse
    by raising. `on_wait()` is called once if another writer holds the lock. A bundle is written this way,
    so an interrupted export never leaves a directory that looks valid, nor loses the one that was there."""
    path = Path(path)
    _make_parent(path)
    with locked(path, on_wait):
        clean_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a bundle is read by other users (containers)
        try:
            yield tmp
            fault_point("bundle-written")
            if os.path.lexists(path):
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "already exists", str(path))
                if check is not None:
                    check(path)
                swap_dirs(tmp, path)  # tmp now holds the old folder
                fault_point("bundle-swapped")
            else:
                os.rename(tmp, path)
        except OSError as e:
            if _about(e, tmp):  # a full disk while writing the bundle: name the bundle, not its temporary
                raise file_error(path, f"cannot write ({e.strerror or e})") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new folder, or the replaced old one


@contextlib.contextmanager
def locked(path: Path, on_wait=None):
    """Hold `.NAME.lock` beside `path` (flock) for the block; the lock file is removed afterwards."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise file_error(path.parent, f"cannot write here ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
                on_wait = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):  # the previous holder may have removed the file
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def clean_leftovers(path: Path) -> list[Path]:
    """Remove what a killed writer of `path` left beside it; put back a folder a two-rename swap set aside.

    Call only while holding `locked(path)`: then no live writer owns these names."""
    removed = []
    old = path.with_name(f".{path.name}.old")
    if os.path.lexists(old):
        if os.path.lexists(path):
            _remove(old)
            removed.append(old)
        else:
            os.rename(old, path)  # killed between the two renames: the old folder goes back
    # exactly tempfile's 8 random characters: `.bundle.v2.x1y2z3w4.partial` is another target's, not ours
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.partial"):
        _remove(leftover)
        removed.append(leftover)
    return removed


def swap_dirs(new: Path, path: Path) -> None:
    """Put `new` at `path` and what was at `path` at `new`: one atomic exchange where the system has it."""
    try:
        _exchange(new, path)
        return
    except OSError as e:
        if e.errno == errno.EBUSY:  # a mount point (a container volume) cannot be renamed
            raise file_error(path, "is a mount point; write the bundle to a folder inside it") from None
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise
    old = path.with_name(f".{path.name}.old")
    os.rename(path, old)
    fault_point("bundle-set-aside")
    os.rename(new, path)
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> None:
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "no renameat2 here")
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl
        raise OSError(errno.ENOSYS, "no renameat2 in this C library")
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


def fault_point(name: str) -> None:
    """Tests kill a real process here: with DTK_FAULT_PAUSE=name, say so on stderr and wait to be killed."""
    if os.environ.get(FAULT_ENV) == name:
        print(f"dtk: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(600)


def _about(error: OSError, tmp: Path) -> bool:
    """The error concerns no file in particular, or the temporary `tmp` (or a file inside it)."""
    if error.filename is None:
        return True
    name = os.fspath(error.filename)
    return name == str(tmp) or name.startswith(str(tmp) + os.sep)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise file_error(path.parent, "is not a directory") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
