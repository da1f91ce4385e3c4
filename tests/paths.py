"""A PATH with chosen programs taken away, for tests of what happens on a machine without them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def path_without(folder: Path, programs: Iterable[str]) -> str:
    """A PATH of one new folder holding every program of the real PATH but `programs`
    (removing whole folders from PATH would take /usr/bin with them)."""
    leave_out = set(programs)
    folder.mkdir(parents=True, exist_ok=True)
    for entry_dir in os.environ.get("PATH", os.defpath).split(os.pathsep):
        try:
            entries = list(os.scandir(entry_dir or "."))
        except OSError:
            continue
        for entry in entries:
            target = folder / entry.name
            if entry.name in leave_out or target.exists() or target.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(folder)
