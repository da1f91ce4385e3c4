"""Kernel builds are data: a profile and its image, stored in Redis by sha256, so that every
worker boots exactly the same bytes. The built-in builds are registered on first use; a user
adds their own with ``fuzzfarm kernel add PROFILE.toml``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from kernel_emu.errors import ProfileError
from kernel_emu.profile import BUILTIN_PROFILES, PROFILE_DIR, TargetProfile, load_profile_file
from workers.store import FarmStore, sha256

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STORED_IMAGE = "image.elf"


class KernelError(ProfileError):
    """A kernel build that cannot be added or found."""


def add_kernel(store: FarmStore, profile_path: Path, name: str | None = None) -> str:
    """Upload a profile and its image; returns the build's name. Re-adding the same bytes is a
    no-op; the same name with other bytes replaces the build."""
    profile = load_profile_file(profile_path)  # validates the profile and finds the image
    name = name or profile.name
    if not NAME.match(name):
        raise KernelError(f"kernel name {name!r}: use letters, digits, '.', '_' or '-'")
    stored = stored_profile(profile_path.read_text(), profile_path)
    image_sha = store.blobs.put(profile.image.read_bytes())
    store.kernels.put(name, stored, image_sha, profile.description)
    return name


def stored_profile(text: str, source: Path) -> str:
    """The profile as workers get it: the same text, comments and layout included, with its
    image named as the worker's cache names it."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise KernelError(f"{source}: {e}") from None
    if "image" not in doc:
        raise KernelError(f"{source}: no top-level image = ... to rewrite")
    doc["image"] = STORED_IMAGE
    return tomlkit.dumps(doc)


def ensure_builtin(store: FarmStore) -> None:
    known = set(store.kernels.names())
    for name in BUILTIN_PROFILES:
        if name not in known:
            add_kernel(store, PROFILE_DIR / f"{name}.toml")


def materialize(store: FarmStore, name: str, cache: Path) -> TargetProfile:
    """This build as files on the worker's disk (cached by image sha), loaded as a profile."""
    entry = store.kernels.get(name)
    if entry is None and name in BUILTIN_PROFILES:
        ensure_builtin(store)
        entry = store.kernels.get(name)
    if entry is None:
        raise KernelError(f"unknown kernel build '{name}': add it with fuzzfarm kernel add")
    folder = cache / "kernels" / entry.image[:16] / sha256(entry.profile.encode())[:16]
    profile_file = folder / f"{name}.toml"
    if not profile_file.is_file():
        image = store.blobs.get(entry.image)
        if image is None or sha256(image) != entry.image:
            raise KernelError(f"kernel build '{name}': its image is missing from Redis")
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / STORED_IMAGE, image)
        _write(profile_file, entry.profile.encode())
    return load_profile_file(profile_file)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
