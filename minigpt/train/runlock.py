"""One run per folder: a lock file that a second run pointed at the same folder finds held.

On Linux and macOS the lock is fcntl.flock on <out_dir>/.lock: the kernel releases it when the
holding process ends in any way (kill -9, a crash, a power cut), so a crashed run never blocks the
next one, and the file's content (the holder's pid and host) only serves the message. Where fcntl
is missing (Windows), the file's pid is the lock: it is taken over when no process with that pid
is alive (checked with os.kill(pid, 0) where that exists).
"""

import json
import os
import socket
from pathlib import Path

from minigpt import safeio
from minigpt.errors import FileSystemError, ResourceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


def _holder(text: str) -> str:
    try:
        d = json.loads(text)
        return f"pid {int(d['pid'])} on {d.get('host', '?')}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, AttributeError):
        return True  # exists but not ours, or no way to tell: assume alive
    return True


class RunLock:
    """with RunLock(out_dir): ...   ResourceError if a live run holds the folder."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd = None

    def acquire(self) -> "RunLock":
        safeio.make_dir(self.folder)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        try:
            if fcntl is not None:
                self._acquire_flock(me)
            else:
                self._acquire_pidfile(me)
        except OSError as e:
            raise FileSystemError(f"{self.path}: cannot create the run lock: {safeio.reason(e)}") from None
        return self

    def _refuse(self, text: str):
        raise ResourceError(f"{self.folder}: a live run ({_holder(text)}) is writing this folder; "
                            "wait for it, stop it, or choose another [train] out_dir")

    def _acquire_flock(self, me: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            self._refuse(text)
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd

    def _acquire_pidfile(self, me: str) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = self.path.read_text(errors="replace")
                try:
                    pid = int(json.loads(text)["pid"])
                except (ValueError, KeyError, TypeError):
                    pid = None
                if pid is not None and _alive(pid):
                    self._refuse(text)
                self.path.unlink(missing_ok=True)  # left by a run that is gone: take it over
                continue
            os.write(fd, me.encode())
            self._fd = fd
            return
        self._refuse("")

    def release(self) -> None:
        if self._fd is None:
            return
        if fcntl is not None:
            try:
                os.ftruncate(self._fd, 0)  # nobody holds it now: an empty file (a folder's
            except OSError:  # contents stay the same from one finished run to the next)
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        else:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
