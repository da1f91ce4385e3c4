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
