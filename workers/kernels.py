"""Kernel builds are data: a profile and its image, stored in Redis by sha256, so that every
worker boots exactly the same bytes. The built-in builds are registered on first use; a user
adds their own with ``fuzzfarm kernel add PROFILE.toml``.

What a worker boots is checked against the build's sha256 every time the build is loaded, from
Redis or from the worker's cache alike: a cached image changed since it was written is fetched
again, never booted. Names from Redis are checked (`workers.paths`) before they become paths,
and a stored profile may name no image but the one beside it."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from kernel_emu.errors import ProfileError
from kernel_emu.profile import BUILTIN_PROFILES, PROFILE_DIR, TargetProfile, load_profile_file
from workers.paths import KERNEL_NAME, SHA256, checked, private_dir
from workers.store import FarmStore, sha256

log = logging.getLogger("fuzzfarm.workers")

NAME = KERNEL_NAME
STORED_IMAGE = "image.elf"
# a UEFI application, its link map (where its symbols come from) and its DWARF companion (source
# lines, for the dashboard), as a worker stores them
STORED_EFI = "image.efi"
STORED_MAP = "image.map"
STORED_IMAGES = (STORED_IMAGE, STORED_EFI)


def stored_name(image: bytes) -> str:
    """What a worker calls this image on its disk: a PE (UEFI application) keeps its suffix, so
    its link map is found beside it."""
    return STORED_EFI if image[:2] == b"MZ" else STORED_IMAGE


class KernelError(ProfileError):
    """A kernel build that cannot be added or found."""


def add_kernel(store: FarmStore, profile_path: Path, name: str | None = None,
               image_sha256: str | None = None) -> str:
    """Upload a profile and its image; returns the build's name. Re-adding the same bytes is a
    no-op; the same name with other bytes replaces the build. With `image_sha256`, the image
    must have that hash. What Redis then holds is read back and checked."""
    profile = load_profile_file(profile_path)  # validates the profile and finds the image
    name = name or profile.name
    if not NAME.match(name):
        raise KernelError(f"kernel name {name!r}: use letters, digits, '.', '_' or '-'")
    image = profile.image.read_bytes()
    stored = stored_profile(profile_path.read_text(), profile_path, stored_name(image))
    image_sha = sha256(image)
    if image_sha256 is not None and image_sha != image_sha256.lower():
        raise KernelError(f"{profile.image}: its sha256 is {image_sha}, not {image_sha256}")
    map_sha = debug_sha = ""
    if stored_name(image) == STORED_EFI:
        debug_path = profile.image.with_suffix(".debug")
        if debug_path.is_file():  # optional: without it the dashboard shows no source lines
            debug_sha = store.blobs.put(debug_path.read_bytes())
        map_path = profile.image.with_suffix(".map")
        try:
            map_sha = store.blobs.put(map_path.read_bytes())
        except OSError as e:
            raise KernelError(f"{profile.image.name} is a UEFI application: its symbols come "
                              f"from the link map beside it ({map_path.name}, from lld-link "
                              f"/MAP), which cannot be read: {e.strerror}") from None
    store.blobs.put(image)
    if not store.blobs.holds(image_sha):
        # a blob of that name with other bytes, which nothing in the farm writes
        log.warning("kernel add: Redis held other bytes under image %s; replaced", image_sha)
        store.blobs.overwrite(image)
        if not store.blobs.holds(image_sha):
            raise KernelError(f"kernel build '{name}': Redis does not keep its image intact")
    store.kernels.put(name, stored, image_sha, profile.description, map_sha, debug_sha)
    entry = store.kernels.get(name)
    if entry is None or entry.image != image_sha or entry.profile != stored or \
            entry.map != map_sha or entry.debug != debug_sha:
        raise KernelError(f"kernel build '{name}': Redis does not hold it as uploaded (was it "
                          "replaced at the same moment?)")
    return name


def stored_profile(text: str, source: Path, image_name: str = STORED_IMAGE) -> str:
    """The profile as workers get it: the same text, comments and layout included, with its
    image named as the worker's cache names it (`image_name`, one of STORED_IMAGES)."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise KernelError(f"{source}: {e}") from None
    if "image" not in doc:
        raise KernelError(f"{source}: no top-level image = ... to rewrite")
    doc["image"] = image_name
    return tomlkit.dumps(doc)


def ensure_builtin(store: FarmStore) -> None:
    known = set(store.kernels.names())
    for name in BUILTIN_PROFILES:
        if name not in known:
            add_kernel(store, PROFILE_DIR / f"{name}.toml")


def materialize(store: FarmStore, name: str, cache: Path) -> TargetProfile:
    """This build as files on the worker's disk (cached by image sha), loaded as a profile.
    The cached image is hashed at every call: one that is not the build's is written again
    from Redis (whose bytes are checked too) before the profile is loaded."""
    checked("kernel build name", KERNEL_NAME, name)
    entry = store.kernels.get(name)
    if entry is None and name in BUILTIN_PROFILES:
        ensure_builtin(store)
        entry = store.kernels.get(name)
    if entry is None:
        raise KernelError(f"unknown kernel build '{name}': add it with fuzzfarm kernel add")
    image_sha = checked(f"image sha256 of kernel build '{name}'", SHA256, entry.image)
    stored_as = _check_stored_image(name, entry.profile)
    map_sha = checked(f"link-map sha256 of kernel build '{name}'", SHA256, entry.map) \
        if stored_as == STORED_EFI else ""
    profile_text = entry.profile.encode()
    folder = private_dir(cache) / "kernels" / image_sha[:16] / sha256(profile_text)[:16]
    image_file = folder / stored_as
    map_file = folder / STORED_MAP
    profile_file = folder / f"{name}.toml"
    if not (_holds(image_file, image_sha) and _read(profile_file) == profile_text
            and (not map_sha or _holds(map_file, map_sha))):
        if image_file.exists():
            log.warning("kernel build '%s': the cached copy in %s is not the build's; fetching "
                        "it again", name, folder)
        image = _blob(store, name, "image", image_sha)
        folder.mkdir(parents=True, exist_ok=True)
        if map_sha:
            _write(map_file, _blob(store, name, "link map", map_sha))
        _write(image_file, image)
        _write(profile_file, profile_text)
    return load_profile_file(profile_file)


def _blob(store: FarmStore, name: str, what: str, sha: str) -> bytes:
    data = store.blobs.get(sha)
    if data is None or sha256(data) != sha:
        raise KernelError(f"kernel build '{name}': its {what} is missing from Redis or "
                          "does not match its sha256")
    return data


def _check_stored_image(name: str, profile: str) -> str:
    """A stored profile names its image as `image.elf` or `image.efi` beside it
    (`stored_profile` wrote it so): anything else could point a worker at a file outside the
    cache. Returns the name."""
    try:
        image = tomllib.loads(profile).get("image")
    except tomllib.TOMLDecodeError as e:
        raise KernelError(f"kernel build '{name}': its stored profile is not TOML: {e}") from None
    if image not in STORED_IMAGES:
        raise KernelError(f"kernel build '{name}': its stored profile names the image "
                          f"{image!r:.80}, not {' or '.join(map(repr, STORED_IMAGES))}")
    return str(image)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _holds(path: Path, sha: str) -> bool:
    data = _read(path)
    return data is not None and sha256(data) == sha


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
