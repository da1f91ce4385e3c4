"""Signatures: stable across inputs and builds, specific to where the bug is."""

from __future__ import annotations

from kernel_emu.result import Finding


def test_signature_drops_offsets_and_keeps_the_field_of_semantic_classes() -> None:
    a = Finding("vaddr-corruption", ["x"], frames=["f+0x10", "g+0x4", "h", "i"],
                field="segments[0].vaddr")
    b = Finding("vaddr-corruption", ["y"], frames=["f+0x22", "g+0x8", "h+0x1"],
                field="segments[0].vaddr")
    assert a.signature() == b.signature() == "vaddr-corruption | f < g < h | segments[n].vaddr"


def test_signature_folds_segment_indexes() -> None:
    # how many program headers came before the bad one depends on the input, not on the bug
    frames = ["rustux::loader::map_segments+0x10"]
    found = [Finding("vaddr-corruption", ["x"], frames=frames, field=f"segments[{i}].memsz")
             for i in (0, 1, 8, 89, 95)]
    assert {f.signature() for f in found} == {
        "vaddr-corruption | rustux::loader::map_segments | segments[n].memsz"}
    assert found[0].field == "segments[0].memsz" and found[3].field == "segments[89].memsz"


def test_a_site_names_the_signature_wherever_the_run_stopped() -> None:
    at_entry = Finding("vaddr-corruption", ["x"], frames=["enter_user+0x1"],
                       field="segments[2].flags", site="segment table")
    refused = Finding("vaddr-corruption", ["y"], frames=["reject+0x8", "load_init+0x30"],
                      field="segments[0].flags", site="segment table")
    assert at_entry.signature() == refused.signature() == \
        "vaddr-corruption | segment table | segments[n].flags"
    assert Finding.from_json(at_entry.to_json()) == at_entry


def test_signature_of_a_non_semantic_class_ignores_the_field() -> None:
    f = Finding("kernel-panic", ["x"], frames=["f"], field="src/a.rs:10")
    assert f.signature() == "kernel-panic | f"


def test_signature_skips_the_panic_machinery() -> None:
    frames = ["__rustc::rust_begin_unwind+0x20", "core::panicking::panic_fmt+0x30",
              "core::panicking::panic_const::panic_const_rem_by_zero+0x10",
              "rustux::loader::elf::collect_segments+0x99", "rustux::loader::elf::load+0x1",
              "rustux::loader::load_init+0x2"]
    f = Finding("kernel-panic", ["x"], frames=frames)
    assert f.signature() == ("kernel-panic | rustux::loader::elf::collect_segments < "
                             "rustux::loader::elf::load < rustux::loader::load_init")


def test_signature_without_frames() -> None:
    assert Finding("hang", ["x"]).signature() == "hang | ?"
