"""Kernel image loading and symbol names."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_emu import image as image_mod
from kernel_emu.image import clean_rust_name, demangle, load_image
from kernel_emu.profile import load_profile

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("kernel", ["seed", "fixed", "seed-elf"])
def test_demangled_names_agree_with_cxxfilt(kernel: str) -> None:
    """A cross-check only: binutils decides nothing, but where it is installed its demangler
    and the pinned library name every Rust symbol of both builds alike."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("c++filt (binutils) is not installed: nothing to cross-check against")
    profile = load_profile(kernel)
    img = load_image(profile.image, profile.kernel.load_base)
    rust = [s.mangled for s in img.symbols if s.mangled.startswith(("_ZN", "_R"))]
    # both manglings: legacy (the builds' own choice) and v0 (the toolchain's prebuilt code)
    assert sum(n.startswith("_ZN") for n in rust) > 30 and sum(
        n.startswith("_R") for n in rust) > 0
    out = subprocess.run([cxxfilt], input="\n".join(rust) + "\n", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert [clean_rust_name(demangle(n)) for n in rust] == [clean_rust_name(n) for n in out]


def test_demangling_details() -> None:
    assert demangle("_ZN6rustux4boot5start17h0123456789abcdefE") == \
        "rustux::boot::start::h0123456789abcdef"
    assert demangle("_ZN44_$LT$$RF$T$u20$as$u20$core..fmt..Display$GT$3fmt17h0123456789abcdefE"
                    ) == "<&T as core::fmt::Display>::fmt::h0123456789abcdef"
    assert demangle("_ZN3foo3bar17h0000000000000000E.llvm.123") == \
        "foo::bar::h0000000000000000"
    assert clean_rust_name(demangle(
        "_RNvXs8_NtNtNtCsgEmfK2I1SDS_4core3fmt3num3impmNtB9_7Display3fmt")) == \
        "<u32 as core::fmt::Display>::fmt"
    # anything else, readable or not, stays as it is
    for name in ("not_rust", "rustux_isr_0", "_ZN", "_R", "_RNvC", "_Rfoo",
                 "_ZN99999999999999999999fooE", ""):
        assert demangle(name) == name
    assert clean_rust_name("rustux::a::b::h0123456789abcdef") == "rustux::a::b"


def test_demangling_never_raises_on_hostile_names() -> None:
    rng = random.Random(13)
    alphabet = "_ZNRE0123456789abchsvCNtXsMB$LT$.u"
    for _ in range(20_000):
        prefix = rng.choice(["_ZN", "_R", "_RNv", "_RNvXs", ""])
        name = prefix + "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        assert isinstance(demangle(name), str)


def test_signatures_do_not_depend_on_binutils(tmp_path: Path) -> None:
    """A boot with no binutils on PATH gives the same signature and frames as here."""
    tools = tmp_path / "bin"  # a PATH with nothing on it
    tools.mkdir()
    example = ROOT / "fuzzfarm" / "examples" / "vaddr-0x300028.elf"
    runs = []
    for path in (os.environ["PATH"], str(tools)):
        proc = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "boot", "--json",
                               "--kernel", "seed", str(example)], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "PATH": path},
                              timeout=300)
        assert proc.returncode == 1, proc.stderr
        result = json.loads(proc.stdout)
        runs.append((result["signature"], result["backtrace"],
                     [f["frames"] for f in result["findings"]]))
    assert shutil.which("c++filt", path=str(tools)) is None
    assert runs[0] == runs[1]
    assert "::" in runs[0][0]  # frames are demangled Rust names
    # and so is every symbol a frame can name, standard-library (v0-mangled) ones included
    names = "import json,sys; from kernel_emu.image import KernelImage; from kernel_emu.profile \
import load_profile; print(json.dumps([s.name for s in KernelImage(load_profile(sys.argv[1]).image\
).symbols]))"
    for kernel in ("seed", "fixed"):
        seen = [json.loads(subprocess.run([sys.executable, "-c", names, kernel], cwd=ROOT,
                                          env={**os.environ, "PATH": path}, check=True,
                                          capture_output=True, text=True).stdout)
                for path in (os.environ["PATH"], str(tools))]
        assert seen[0] == seen[1]
        assert not any(n.startswith(("_ZN", "_R")) for n in seen[0])


def test_profile_symbols_resolve() -> None:
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
                fresh.forget_descriptions()
                assert img.describe(address, return_address=ret) == \
                    fresh.describe(address, return_address=ret)
    # a function's first byte is itself, but as a return address the end of the one before
    assert img.describe(starts[1]) != img.describe(starts[1], return_address=True)
    assert img.remembered_descriptions <= 150
