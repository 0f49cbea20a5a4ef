"""Writing output files atomically: a temporary file in the target folder, then a rename.

A reader (or a crash) never sees half a PNG or half an .npy under its final name.
"""

from __future__ import annotations

import contextlib
import os
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
    remove it. OS errors become one-line OutputErrors naming `path`."""
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{target}: {what} ({exc.strerror or exc})") from None
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{target}: {what} ({exc.strerror or exc})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


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
