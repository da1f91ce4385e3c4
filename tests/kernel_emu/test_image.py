"""Kernel image loading and symbol names."""

from __future__ import annotations

import shutil

import pytest

from kernel_emu import image as image_mod
from kernel_emu.image import clean_rust_name, demangle_legacy, load_image
from kernel_emu.profile import load_profile


@pytest.mark.parametrize("kernel", ["seed", "fixed"])
def test_python_demangler_agrees_with_cxxfilt(kernel: str) -> None:
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt is not installed")
    img = load_image(load_profile(kernel).image)
    legacy = [s.mangled for s in img.symbols if s.mangled.startswith("_ZN")]
    assert len(legacy) > 30
    assert [demangle_legacy(n) for n in legacy] == image_mod._demangle_all(legacy)


def test_legacy_demangling_details() -> None:
    assert demangle_legacy("_ZN6rustux4boot5start17h0123456789abcdefE") == \
        "rustux::boot::start::h0123456789abcdef"
    assert demangle_legacy("_ZN44_$LT$$RF$T$u20$as$u20$core..fmt..Display$GT$3fmt3h00E") == \
        "<&T as core::fmt::Display>::fmt::h00"
    assert demangle_legacy("_ZN3foo3bar17h0000000000000000E.llvm.123") == \
        "foo::bar::h0000000000000000"
    assert demangle_legacy("not_rust") is None
    assert demangle_legacy("_ZN3fooE9") is None
    assert clean_rust_name("rustux::a::b::h0123456789abcdef") == "rustux::a::b"


def test_profile_symbols_resolve_without_cxxfilt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod.shutil, "which", lambda _name: None)
    profile = load_profile("seed")
    img = image_mod.KernelImage(profile.image)
    for name in (profile.heap.alloc_symbol, profile.heap.free_list_symbol,
                 profile.kernel.snapshot_symbol, profile.kernel.success_symbol):
        assert img.symbol(name).address


def test_remembered_descriptions_match_fresh_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    img = image_mod.KernelImage(load_profile("seed").image)
    fresh = image_mod.KernelImage(load_profile("seed").image)
    starts = [s.address for s in img.symbols if s.size][:200]
    probes = [a + d for a in starts for d in (0, 1)] + [0, 1, 0xFFFF_FFFF_FFFF_FFFF]
    monkeypatch.setattr(image_mod, "DESCRIBED_KEPT", 150)  # the memory is also emptied
    for _ in range(2):  # the second pass answers from memory (or after a clear)
        for address in probes:
            for ret in (False, True):
                fresh._described.clear()
                assert img.describe(address, return_address=ret) == \
                    fresh.describe(address, return_address=ret)
    # a function's first byte is itself, but as a return address the end of the one before
    assert img.describe(starts[1]) != img.describe(starts[1], return_address=True)
    assert len(img._described) <= 150
