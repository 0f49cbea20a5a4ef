"""Writing output files atomically: a temporary file in the target folder, then a rename.

A reader (or a crash) never sees half a PNG or half an .npy under its final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path

from ..errors import OutputError


def ensure_output_dir(path) -> Path:
    """Create `path` if needed and check that it is a writable folder; raise OutputError otherwise."""
    out = Path(os.fspath(path))
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another output directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output directory is not writable")
    return out


@contextlib.contextmanager
def atomic_path(path, what: str = "cannot write"):
    """Yield a temporary path in `path`'s folder; on success rename it onto `path`, on any failure
    (an interrupt or a signal included) remove it. OS errors become one-line OutputErrors naming
    `path`. The temporary file is created inside the cleanup scope: an interrupt that lands right
    after its creation still removes it. `path` must be a regular file or absent: a rename onto a
    device or a FIFO would replace it with a regular file."""
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    check_output_file(target)
    tmp, owned = None, False
    try:
        while True:
            tmp = str(folder / f".{target.name}.{secrets.token_hex(4)}.tmp")
            owned = True  # set before the create: an interrupt between the two must still clean up
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                break
            except FileExistsError:
                owned = False  # someone else's file of that name: never ours to remove
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, target)
        owned = False
    except OSError as exc:
        raise OutputError(f"{target}: {what} ({exc.strerror or exc})") from None
    finally:
        if owned:
            _unlink_quietly(tmp)


def check_output_file(path) -> None:
    """Refuse an output path that exists and is not a regular file (a directory, a device such
    as /dev/null, a FIFO, a socket): writing there would replace or block on it."""
    target = Path(os.fspath(path))
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{target}: cannot check the output path ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{target}: exists and is {describe_mode(info.st_mode)}, not a regular file; "
                          "give the path of a file to write")


def describe_mode(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', 'a character device'... for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def read_user_file(path, limit, error, what: str = "file", hint: str = "") -> bytes:
    """The bytes of a file the user named, checked before reading: a regular file (not a FIFO,
    which would block forever, nor a device such as /dev/zero, which never ends, nor a directory)
    of at most `limit` bytes (None: no limit). The file is opened without blocking and checked
    through the open descriptor, so a path swapped for a FIFO after a check cannot hang either.
    Problems raise `error` (an OnnxcamError class) naming the path; `hint` says what to do about a
    file over the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: is {describe_mode(info.st_mode)}, not {what_article(what)}")
        if limit is not None and info.st_size > limit:
            raise error(f"{path}: {info.st_size / 2**20:.0f} MB is over the limit of {limit / 2**20:.0f} MB for "
                        f"this {what}{'; ' + hint if hint else ''}")
        chunks, total = [], 0
        with os.fdopen(fd, "rb", closefd=False) as f:
            while True:  # a file that grows while read is cut at the limit, not followed forever
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                total += len(chunk)
                if limit is not None and total > limit:
                    raise error(f"{path}: grew past {limit / 2**20:.0f} MB while being read; refused")
                chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def what_article(what: str) -> str:
    return ("an " if what[:1] in "aeiou" else "a ") + what


def file_identity(path):
    """(device, inode) of an existing file, or None: two paths naming one file (links) compare equal."""
    try:
        info = os.stat(os.fspath(path))
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def temporary_directory(prefix: str = "onnxcam-", parent=None):
    """A fresh private folder under `parent` (default $TMPDIR), removed with everything in it on
    any exit (interrupts and signals included); created inside the cleanup scope, like
    `atomic_path`'s files."""
    import shutil

    base = Path(tempfile.gettempdir()) if parent is None else Path(os.fspath(parent))
    folder, owned = None, False
    try:
        while True:
            folder = base / f"{prefix}{secrets.token_hex(6)}"
            owned = True
            try:
                os.mkdir(folder, 0o700)
                break
            except FileExistsError:
                owned = False
        yield str(folder)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(os.fspath(path))


def default_permissions(path) -> None:
    """mkstemp creates files 0600; give outputs the usual 0666 & ~umask like open() would."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux allows: os.umask(0) to query it
    would leave a window in which another thread creates world-writable files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


_UMASK_LOCK = threading.Lock()


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
