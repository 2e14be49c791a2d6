"""Writing result files and folders so that a crash never leaves a half-written or mixed one:
each is written under a temporary name beside its place and renamed in; a failed write takes
its temporary file with it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Calls `write` on a temporary name next to `path`, then renames it into place.

    A reader sees the old file or the new one, never a part. Where `write` fails (a full
    disk, no permission) the temporary file is removed and the OSError names `path`.
    """
    path = Path(path)
    # the pid keeps two processes writing the same file from sharing a temporary name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise named(e, path) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda p: p.write_text(text))


def named(error: OSError, path: Path) -> OSError:
    """The same error with `path` as its file (pyarrow's and numpy's name none)."""
    if error.filename is not None:
        return error
    code = error.errno if error.errno is not None else _errno_in(str(error))
    reason = os.strerror(code) if code is not None else str(error)
    return OSError(code, reason, str(path))


def _errno_in(text: str) -> int | None:
    """The errno an error message without one speaks of (pyarrow's say it in words)."""
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EIO):
        if os.strerror(code) in text:
            return code
    return None


def describe(error: OSError) -> str:
    """One line for an OSError: the file, then what went wrong."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_dir(new: Path, target: Path) -> None:
    """Puts the complete folder `new` in the place of `target` (which may not exist) and
    removes the old one. Where the kernel can, the two are exchanged in one step, so
    `target` always names a whole folder, old or new."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # (the old folder, now under the new name)
        return
    # without an atomic exchange: a moment with no `target`, never one that mixes files
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths with Linux's renameat2(RENAME_EXCHANGE); False where it is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    done = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem
        return False
    raise OSError(code, os.strerror(code), str(b))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a folder or lock it left is then still in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
