"""The committed seed corpus: it boots on both kernel builds, matches its manifest, covers what
it claims to, and comes out of the builder again."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lief
import pytest

from corpus.seeds import (
    MANIFEST,
    SEED_DIR,
    Manifest,
    SeedInfo,
    main,
    read_manifest,
    toolchain_versions,
    write_seeds,
)
from corpus.toolchain import gcc_available
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

needs_gcc = pytest.mark.skipif(not gcc_available(), reason="gcc is required")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return read_manifest(SEED_DIR)


def _seed(info: SeedInfo) -> bytes:
    return (SEED_DIR / info.file).read_bytes()


def _loads(binary: lief.ELF.Binary) -> list[lief.ELF.Segment]:
    return [s for s in binary.segments if s.type == lief.ELF.Segment.TYPE.LOAD]


def test_manifest_matches_the_files(manifest: Manifest) -> None:
    assert 20 <= len(manifest.seeds) <= 40
    listed = {info.file for info in manifest.seeds}
    assert len(listed) == len(manifest.seeds)
    on_disk = {p.name for p in SEED_DIR.iterdir() if p.name != MANIFEST}
    assert on_disk == listed
    for info in manifest.seeds:
        data = _seed(info)
        assert hashlib.sha256(data).hexdigest() == info.sha256, info.file
        assert len(data) == info.size, info.file
        assert info.description, info.file
    sizes = [info.size for info in manifest.seeds]
    assert max(sizes) <= 16 * 1024
    assert sum(sizes) < 512 * 1024


@pytest.mark.parametrize("kernel", ["fixed", "seed"])
def test_every_seed_boots_ok(manifest: Manifest, kernel: str) -> None:
    executor = Executor(load_profile(kernel))
    failed = {}
    for info in manifest.seeds:
        result = executor.run(_seed(info))
        if result.verdict != "ok":
            failed[info.file] = (result.verdict, result.crash_class, result.reject_reason)
            continue
        assert len(result.segments) == info.loads, info.file
        assert result.segments == result.expected_segments, info.file
    assert not failed


def test_lief_reads_every_seed_as_an_x86_64_executable(manifest: Manifest) -> None:
    for info in manifest.seeds:
        binary = lief.ELF.parse(_seed(info))
        assert binary is not None, info.file
        header = binary.header
        assert header.file_type == lief.ELF.Header.FILE_TYPE.EXEC, info.file
        assert header.machine_type == lief.ELF.ARCH.X86_64, info.file
        assert header.identity_class == lief.ELF.Header.CLASS.ELF64, info.file
        assert len(_loads(binary)) == info.loads, info.file
        assert header.numberof_segments == info.phnum, info.file
        assert f"{binary.entrypoint:#x}" == info.entry, info.file


def test_the_corpus_covers_what_it_should(manifest: Manifest) -> None:
    counts: set[int] = set()
    aligns: set[int] = set()
    bss = no_bss = entry_off_start = entry_later_segment = 0
    for info in manifest.seeds:
        binary = lief.ELF.parse(_seed(info))
        loads = _loads(binary)
        counts.add(len(loads))
        aligns.update(s.alignment for s in loads)
        bss += any(s.virtual_size > s.physical_size for s in loads)
        no_bss += all(s.virtual_size == s.physical_size for s in loads)
        code = [s for s in loads if s.has(lief.ELF.Segment.FLAGS.X)]
        text = binary.get_section(".text") if binary.has_section(".text") else None
        if text is not None and binary.entrypoint != text.virtual_address:
            entry_off_start += 1
        if code and not code[0].virtual_address <= binary.entrypoint < (
                code[0].virtual_address + code[0].virtual_size):
            entry_later_segment += 1
    assert {1, 2, 3, 4, 6, 8, 12, 16, 17, 20} <= counts
    assert {1, 8, 0x10, 0x1000, 0x10000, 0x200000} <= aligns
    assert bss >= 10
    assert no_bss >= 1
    assert entry_off_start >= 3
    assert entry_later_segment >= 3


def test_no_seed_is_tailored_to_the_allocator_edge(manifest: Manifest) -> None:
    """Reaching the split threshold is for the fuzzer to find: every seed leaves the heap's
    free block far from it on the seed build."""
    for info in manifest.seeds:
        binary = lief.ELF.parse(_seed(info))
        memsz = [s.virtual_size for s in _loads(binary)]
        left = _seed_heap_leftovers(info.phnum, memsz)
        assert min(left) >= 0x10000, info.file


def _seed_heap_leftovers(phnum: int, memsz: list[int]) -> list[int]:
    """The seed build's loader (BUGS.md, "Loader heap use"): the bytes its one free block has
    left after each request (segment table sized by e_phnum, buffer pointers, the buffers, the
    LoadedElf), each split off the front with a 40-byte header; -1 when a request does not
    fit."""
    free = 0x100_0000 - 40
    out = []
    for request in (40 * phnum, 8 * len(memsz), *memsz, 40):
        need = (max(request, 1) + 7) & ~7
        if need > free:
            return [*out, -1]
        out.append(free - need)
        free -= need + 40
    return out


@needs_gcc
def test_regenerating_gives_the_same_seeds(manifest: Manifest, tmp_path: Path) -> None:
    infos = write_seeds(tmp_path)
    assert [(i.file, i.loads, i.phnum, i.entry) for i in infos] == \
        [(i.file, i.loads, i.phnum, i.entry) for i in manifest.seeds]
    assert read_manifest(tmp_path).seeds == infos
    if toolchain_versions() != manifest.toolchain:
        pytest.skip("another gcc, ld or LIEF than the committed seeds were built with")
    assert infos == manifest.seeds
    for info in infos:
        assert (tmp_path / info.file).read_bytes() == _seed(info), info.file


@needs_gcc
def test_regenerating_removes_seeds_the_catalogue_dropped(tmp_path: Path) -> None:
    write_seeds(tmp_path)
    text = (tmp_path / MANIFEST).read_text().replace('"loads-02.elf"', '"dropped.elf"')
    (tmp_path / MANIFEST).write_text(text)
    (tmp_path / "dropped.elf").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    write_seeds(tmp_path)
    assert not (tmp_path / "dropped.elf").exists()
    assert (tmp_path / "notes.txt").exists()
    assert (tmp_path / "loads-02.elf").exists()


def test_main_without_gcc_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-dir"))
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gcc not found")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_main_refuses_a_file_as_output(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["--out", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
