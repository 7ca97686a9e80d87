"""Errors a user can cause. The command line prints their message on one line and exits with 2."""


class MiniGPTError(Exception):
    """Bad input: the message names what was wrong and where."""


class ConfigError(MiniGPTError):
    """A config file, a --set override or a command-line value is wrong."""


class DataError(MiniGPTError):
    """A corpus is missing, empty, unreadable, or cannot be encoded."""


class CheckpointError(MiniGPTError):
    """A checkpoint is missing, truncated, corrupt or not ours."""


class FileSystemError(MiniGPTError):
    """A file or folder cannot be created, written or read: no permission, a read-only file
    system, a full disk. The message names the path and the reason."""


class ResourceError(MiniGPTError):
    """The machine lacks what a command needs (memory), or another run holds the folder."""
