"""Observers that feed the guest's behaviour to libFuzzer: edge coverage and compare operands.

The fuzzer must learn from the *guest*, not from this harness: no Python code is instrumented.
Each run's 64 KiB hit-count map (built by the native tracer's block hook) is copied into a
counter array registered with libFuzzer as inline 8-bit counters, and every guest ``cmp`` is
reported to libFuzzer's ``__sanitizer_cov_trace_cmp4/8`` so its compare table (TORC) can offer
the operands to its mutations. Both paths are native (``fuzz._feedback``): a Python callback per
guest compare would cost ~0.4 µs each. :class:`PythonFeedback` does the same in Python, slowly,
for machines where the extension is not built.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Protocol

from unicorn import UC_HOOK_TCG_OPCODE, UC_TCG_OP_FLAG_CMP, UC_TCG_OP_SUB, Uc

from kernel_emu.tracing import add_native_hook

try:
    from fuzz import _feedback
except ImportError:  # pragma: no cover - exercised only where the extension is not built
    _feedback = None

MAP_SIZE = 65536
LIBFUZZER_MODULE = "atheris.core_with_libfuzzer"

CmpFunction = Any  # a ctypes function pointer taking two unsigned integers


class LibFuzzer:
    """The entry points of the libFuzzer that Atheris loaded. Only available once
    ``atheris.Fuzz()`` has started: Atheris imports its libFuzzer module lazily."""

    def __init__(self) -> None:
        module = sys.modules.get(LIBFUZZER_MODULE)
        if module is None or not getattr(module, "__file__", None):
            raise RuntimeError("libFuzzer is not loaded: call this from inside atheris.Fuzz()")
        self.lib = ctypes.CDLL(module.__file__)
        # getattr: a dunder-prefixed attribute in a class body would be name-mangled
        self.cmp8 = getattr(self.lib, "__sanitizer_cov_trace_cmp8")
        self.cmp8.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        self.cmp8.restype = None
        self.cmp4 = getattr(self.lib, "__sanitizer_cov_trace_cmp4")
        self.cmp4.argtypes = [ctypes.c_uint32, ctypes.c_uint32]
        self.cmp4.restype = None

    @staticmethod
    def address(function: Any) -> int:
        return ctypes.cast(function, ctypes.c_void_p).value or 0

    def register_counters(self, address: int, size: int) -> None:
        init = getattr(self.lib, "__sanitizer_cov_8bit_counters_init")
        init(ctypes.c_void_p(address), ctypes.c_void_p(address + size))


class Feedback(Protocol):
    native: bool

    @property
    def edges(self) -> int: ...

    @property
    def compares(self) -> int: ...

    def connect(self, libfuzzer: LibFuzzer, *, compares: bool = True) -> None:
        """Register the counters with libFuzzer and route compares to it."""

    def attach(self, uc: Uc) -> None:
        """Hook the guest's compares on one machine (call ``ctl_flush_tb`` afterwards)."""

    def collect(self, coverage: memoryview, lines: bytes | None = None) -> int:
        """Take one run's hit-count map; returns how many edges are new. `lines`: the
        tracer's `coverage_lines` (the map's 64-byte lines outside which every counter is
        zero), or None."""


class NativeFeedback:
    native = True

    def __init__(self) -> None:
        if _feedback is None:
            raise ImportError("fuzz._feedback is not built")
        self._state = _feedback.Feedback()

    @property
    def edges(self) -> int:
        return self._state.edges

    @property
    def compares(self) -> int:
        return self._state.compares

    def connect(self, libfuzzer: LibFuzzer, *, compares: bool = True) -> None:
        if compares:
            self._state.route(libfuzzer.address(libfuzzer.cmp8),
                              libfuzzer.address(libfuzzer.cmp4))
        libfuzzer.register_counters(self._state.counters_address, MAP_SIZE)

    def attach(self, uc: Uc) -> None:
        # The Feedback object outlives every machine (the harness holds it), so Unicorn may
        # keep its address as the hook's user data.
        add_native_hook(uc, UC_HOOK_TCG_OPCODE, _feedback.CMP_HOOK, self._state.hook_state,
                         ctypes.c_int(UC_TCG_OP_SUB), ctypes.c_int(UC_TCG_OP_FLAG_CMP))

    def collect(self, coverage: memoryview, lines: bytes | None = None) -> int:
        return self._state.collect(coverage, lines)


class PythonFeedback:
    """Same observations as :class:`NativeFeedback`, through Python callbacks."""

    native = False

    def __init__(self) -> None:
        self._counters = (ctypes.c_uint8 * MAP_SIZE)()
        self._seen = bytearray(MAP_SIZE)
        self._edges = 0
        self._compares = 0
        self._cmp8: CmpFunction | None = None
        self._cmp4: CmpFunction | None = None

    @property
    def edges(self) -> int:
        return self._edges

    @property
    def compares(self) -> int:
        return self._compares

    def connect(self, libfuzzer: LibFuzzer, *, compares: bool = True) -> None:
        if compares:
            self._cmp8, self._cmp4 = libfuzzer.cmp8, libfuzzer.cmp4
        libfuzzer.register_counters(ctypes.addressof(self._counters), MAP_SIZE)

    def attach(self, uc: Uc) -> None:
        uc.hook_add(UC_HOOK_TCG_OPCODE, self._on_compare, None, 1, 0,
                    UC_TCG_OP_SUB, UC_TCG_OP_FLAG_CMP)

    def _on_compare(self, uc: Uc, address: int, arg1: int, arg2: int, size: int,
                    user_data: Any) -> None:
        self._compares += 1
        if size <= 32:
            if self._cmp4 is not None:
                self._cmp4(arg1 & 0xFFFF_FFFF, arg2 & 0xFFFF_FFFF)
        elif self._cmp8 is not None:
            self._cmp8(arg1, arg2)

    def collect(self, coverage: memoryview, lines: bytes | None = None) -> int:
        data = bytes(coverage)
        if len(data) != MAP_SIZE:
            raise ValueError(f"coverage map must be {MAP_SIZE} bytes, not {len(data)}")
        ctypes.memmove(self._counters, data, MAP_SIZE)
        fresh = 0
        seen = self._seen
        for index, count in enumerate(data):
            if count and not seen[index]:
                seen[index] = 1
                fresh += 1
        self._edges += fresh
        return fresh


def make_feedback(native: bool = True) -> Feedback:
    """The native feedback when its extension is built (and `native` is asked), else Python."""
    if native and _feedback is not None:
        return NativeFeedback()
    return PythonFeedback()
