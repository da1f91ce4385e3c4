"""What the mutator knows about a kernel comes from the kernel's profile and image only."""

from __future__ import annotations

import struct
from pathlib import Path

from fuzz.facts import facts_for
from fuzz.mutator import ElfMutator
from kernel_emu.dictionary import learn_values
from kernel_emu.image import load_image
from kernel_emu.profile import load_profile, load_profile_file

EXAMPLES = Path(__file__).parents[2] / "fuzzfarm" / "examples"
THREE = (EXAMPLES / "three-segments.elf").read_bytes()


def _facts(name: str):  # type: ignore[no-untyped-def]
    profile = load_profile(name)
    return facts_for(profile, load_image(profile.image, profile.kernel.load_base))


def test_values_are_learnt_from_the_loader_s_own_code() -> None:
    upstream, fixed = _facts("upstream"), _facts("fixed")
    # the upstream allocator checks every header's magic; its loader wants phentsize > 55
    assert 0xDEAD_BEEF_CAFE_BABE in upstream.values and 0x37 in upstream.values
    # the fixed loader's limits: the largest segment, the end of the user half
    assert {0x1000_0000, 0x8000_0000_0000} <= set(fixed.values)
    assert 0xDEAD_BEEF_CAFE_BABE not in fixed.values
    # ELF constants the loaders compare against: the magic, EM_X86_64
    assert {0x464C_457F, 0x3E} <= set(upstream.values) & set(fixed.values)


def test_learning_ignores_addresses_inside_the_image_and_text() -> None:
    profile = load_profile("fixed")
    image = load_image(profile.image, profile.kernel.load_base)
    values = learn_values(image, profile.kernel.snapshot_symbol)
    assert not [v for v in values if image.start <= v < image.end]
    assert b"[elf] se" not in b"".join(v.to_bytes(8, "little") for v in values)
    assert learn_values(image, "no such symbol") == ()


def test_heap_and_image_come_from_the_profile() -> None:
    facts = _facts("seed")
    assert facts.heap is not None
    assert (facts.heap.base, facts.heap.size, facts.heap.header) == (0x30_0000, 0x100_0000, 40)
    assert facts.places[:3] == (0x30_0000, 0x30_0028, 0x130_0000)
    assert facts.image is not None and facts.image[0] == 0x10_0000


def test_the_profile_s_named_values_come_first(tmp_path: Path) -> None:
    source = load_profile("fixed").source.read_text()
    images = load_profile("fixed").image.parent
    text = source.replace('image = "../images/fixed.efi"', f'image = "{images}/fixed.efi"')
    (tmp_path / "mine.toml").write_text(text + "\n[fuzz]\nvalues = [0x1234_5678, 0x4000]\n")
    profile = load_profile_file(tmp_path / "mine.toml")
    facts = facts_for(profile, load_image(profile.image, profile.kernel.load_base))
    assert facts.values[0] == 0x1234_5678
    assert facts.values.count(0x4000) == 1  # named and learnt: once


def _vaddrs(mutator: ElfMutator, seeds: int) -> set[int]:
    out = set()
    for seed in range(seeds):
        data = mutator.apply("phdr_field", THREE, 65536, seed)
        if data is None:
            continue
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phnum, = struct.unpack_from("<H", data, 0x38)
        for i in range(phnum):
            out.add(struct.unpack_from("<Q", data, phoff + i * 56 + 16)[0])
    return out


def test_a_mutator_without_a_kernel_knows_no_kernel_address() -> None:
    assert 0x30_0028 not in _vaddrs(ElfMutator(), 3000)
    assert 0x30_0028 in _vaddrs(ElfMutator(facts=_facts("seed")), 3000)
