"""Names that come out of Redis, checked before they become part of a path.

Whoever can write to the farm's Redis could otherwise have a worker or the dashboard write or
read a file outside its cache: a kernel build named `../../home/u/.bashrc`, an image id that is
an absolute path, a NUL byte, a trailing newline. Every name read from Redis that a path is
made of is matched here first against a strict pattern; one that fails is the farm's own
error (a HarnessError, never a kernel finding) and never reaches the file system.

The cache folder itself must be this user's own: its default lies in the shared temporary
folder, where another user could create it first and fill it with kernel images of their own.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from kernel_emu.errors import HarnessError

# \Z, not $ (which also matches before a final newline): `.match` of these checks the whole
# string, as `.fullmatch` does
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
KERNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SLICE_ID = re.compile(r"[0-9a-f]{12}\Z")  # uuid4 hex, cut (workers/store/campaigns.py)


class UnsafeName(HarnessError):
    """A name from Redis that cannot be part of a path."""


class UnsafeCache(HarnessError):
    """The cache folder is not this user's own."""


def checked(what: str, pattern: re.Pattern[str], value: object) -> str:
    """`value` if it matches `pattern` whole (no trailing newline slips through), else
    UnsafeName, naming `what` and at most 80 characters of the value."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UnsafeName(f"bad {what} {value!r:.80}")
    return value


def private_dir(path: Path) -> Path:
    """`path` as a folder no other user can change: made (0700) if missing; if it exists it
    must be a folder, not a symlink, owned by this user and writable by no one else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as e:
        raise UnsafeCache(f"cannot make the cache folder {path}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCache(f"the cache folder {path} is not a folder (a symlink?)")
    if info.st_uid != os.getuid():
        raise UnsafeCache(f"the cache folder {path} belongs to another user (uid "
                          f"{info.st_uid}): set FUZZFARM_CACHE to a folder of your own")
    if info.st_mode & 0o022:
        raise UnsafeCache(f"the cache folder {path} is writable by others (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}): chmod go-w it")
    return path
