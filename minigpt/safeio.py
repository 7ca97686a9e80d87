"""Writing files so that a fault loses nothing: every writer in minigpt goes through here.

atomic_write   a whole file: a temporary beside it, flushed and fsynced, renamed over the old one,
               then the folder fsynced so the rename itself survives a power cut. Any fault (a full
               disk, a read-only file system, Ctrl-C, kill -9) leaves the old file whole; the
               temporary is removed (kill -9 may leave a stale one, which the next write replaces).
append_line    one line at the end of a log; on a fault the file is cut back to its old length.
make_dir       a folder and its parents.

Each raises FileSystemError with one line naming the path and the reason (disk full, read-only
file system, permission denied, ...), never an OSError traceback.
"""

import errno
import os
from collections.abc import Callable
from pathlib import Path

from minigpt.errors import FileSystemError

_REASONS = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EEXIST: "a file is in the way",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk?)",
}
if hasattr(errno, "EDQUOT"):
    _REASONS[errno.EDQUOT] = "disk quota exceeded"


def reason(e: OSError) -> str:
    """A short, readable cause of an OSError."""
    return _REASONS.get(e.errno, e.strerror or str(e) or type(e).__name__)


def make_dir(folder) -> Path:
    """Create folder (and its parents) if needed; FileSystemError if it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileSystemError(f"{folder}: cannot create the folder: a file is in the way") from None
    except OSError as e:
        raise FileSystemError(f"{folder}: cannot create the folder: {reason(e)}") from None
    return folder


def fsync_dir(folder) -> None:
    """Flush a folder's entries (a rename) to disk. A no-op where folders cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return  # Windows, or a file system that does not allow it
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write(path, write: Callable) -> Path:
    """Write path as a whole: write(f) fills a binary file object; path is replaced only once
    the new content is on disk."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write_file(path, fill)


def atomic_write_file(path, fill: Callable) -> Path:
    """atomic_write for writers that want a file name, not a file object (safetensors' save_file):
    fill(tmp) writes the temporary file, which is synced, then renamed over path."""
    path = Path(path)
    make_dir(path.parent)
    tmp = tmp_path(path)
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C mid-write: drop the half-written file
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise FileSystemError(f"{path}: cannot write: {reason(e)}; "
                                  f"{'the previous file is unchanged' if path.exists() else 'nothing written'}") from None
        raise
    fsync_dir(path.parent)
    return path


def write_text(path, text: str) -> Path:
    """atomic_write of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def append_line(path, line: str) -> None:
    """Append one line (a newline is added) and flush it to disk; on a fault the file is cut
    back to its old length, so a log never ends in half a line."""
    path = Path(path)
    data = memoryview((line + "\n").encode("utf-8"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise FileSystemError(f"{path}: cannot append: {reason(e)}") from None
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    except OSError as e:
        raise FileSystemError(f"{path}: cannot append: {reason(e)}; the lines before are unchanged") from None
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
