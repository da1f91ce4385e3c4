"""The seed build as a UEFI application, booted by the emulator as a firmware boots one: loaded
at an address the profile chooses, relocated, entered at efi_main."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kernel_emu.errors import ProfileError
from kernel_emu.executor import Executor
from kernel_emu.profile import PROFILE_DIR, load_profile_file

IMAGES = PROFILE_DIR.parent / "images"
EXAMPLES = Path(__file__).parents[2] / "fuzzfarm" / "examples"


def _profile(tmp_path: Path, load_base: int, convention: str = "win64") -> Path:
    """seed.toml, pointed at seed.efi loaded at `load_base`; the allocator takes its arguments
    as Rust functions do on the UEFI target."""
    folder = tmp_path / f"at-{load_base:x}"
    folder.mkdir()
    for name in ("seed.efi", "seed.map"):
        shutil.copy(IMAGES / name, folder / name)
    text = (PROFILE_DIR / "seed.toml").read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("image = "):
            line = 'image = "seed.efi"'
        if line.startswith("load_base = "):
            line = f"load_base = {load_base:#x}"
        if line.startswith("convention = "):
            line = f'convention = "{convention}"'
        lines.append(line)
    path = folder / "seed.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("example", ["three-segments.elf", "vaddr-0x300028.elf"])
def test_two_load_addresses_give_the_same_result(tmp_path: Path, example: str) -> None:
    data = (EXAMPLES / example).read_bytes()
    results = []
    for base in (0x10_0000, 0x23_0000):
        executor = Executor(load_profile_file(_profile(tmp_path, base)))
        assert executor.image.load_base == base
        assert executor.image.entry == executor.image.symbol("efi_main").address > base
        results.append(executor.run(data))
    a, b = results
    assert (a.verdict, a.signature) == (b.verdict, b.signature)
    assert [(f.cls, f.field) for f in a.findings] == [(f.cls, f.field) for f in b.findings]
    assert a.segments == b.segments
    assert "[user] enter rip=0x400120" in a.log and "[user] enter rip=0x400120" in b.log
    if example.startswith("vaddr"):
        assert a.verdict == "crash"
        assert [(f.cls, f.field) for f in a.findings][:3] == [
            ("heap-corruption", "allocation.overlap"), ("vaddr-corruption", "segments"),
            ("vaddr-corruption", "segments[0].vaddr")]
        assert a.segments[0]["vaddr"] == 0x300028
    else:
        assert a.verdict == "ok", a.findings


def test_a_profile_names_a_known_calling_convention(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="convention must be one of sysv64, win64"):
        load_profile_file(_profile(tmp_path, 0x10_0000, convention="fastcall"))


def test_the_uefi_build_buckets_every_bug_as_the_elf_build_does() -> None:
    """Frames walked by the unwind tables (.pdata/.xdata), in watch events and at the stop:
    every planted bug's reproducer gets the signature the ELF build gives it."""
    from kernel_emu.profile import load_profile
    from tests.reproducers import REPRODUCERS

    base = (EXAMPLES / "three-segments.elf").read_bytes()
    for native in (True, False):
        pe = Executor(load_profile("seed"), native=native)
        elf = Executor(load_profile("seed-elf"), native=native)
        for reproducer in REPRODUCERS if native else REPRODUCERS[:3]:
            data = reproducer.make(base)
            a, b = pe.run(data), elf.run(data)
            assert a.signature == b.signature, reproducer.bug
            assert a.signature is not None and " < 0x" not in a.signature


def test_canary_classes_name_a_crash_class_per_bug(tmp_path: Path) -> None:
    path = _profile(tmp_path, 0x10_0000)
    profile = load_profile_file(path)
    assert len(profile.canaries.classes) == len(profile.canaries.names)
    assert dict(zip(profile.canaries.names, profile.canaries.classes,
                    strict=True))["RX-14"] == "memory-leak"
    text = path.read_text()
    too_few = '["heap-corruption"]'
    unknown = "[" + ", ".join(['"hang"'] * 16 + ['"no-such-class"']) + "]"
    for bad in (too_few, unknown):
        start = text.index("classes = [")
        end = text.index("]", start) + 1
        path.write_text(text[:start] + "classes = " + bad + text[end:])
        with pytest.raises(ProfileError, match="classes must name a crash class per bug"):
            load_profile_file(path)
