"""Build the native tracing hooks; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kernel_emu._tracer",
            ["kernel_emu/native/tracer.c"],
            depends=["kernel_emu/native/bulk.h", "kernel_emu/native/guard.h",
                     "kernel_emu/native/blockcount.h", "kernel_emu/native/pagemap.h",
                     "kernel_emu/native/dirtycount.h"],
            extra_compile_args=["-O2"],
        ),
        Extension(
            "kernel_emu._walk",
            ["kernel_emu/native/walk.c"],
            depends=["kernel_emu/native/pagemap.h", "kernel_emu/native/reach.h",
                     "kernel_emu/native/userspace.h", "kernel_emu/native/klog.h",
                     "kernel_emu/native/dirtycount.h"],
            extra_compile_args=["-O2"],
        ),
        Extension(
            "fuzz._feedback",
            ["fuzz/native/feedback.c"],
            extra_compile_args=["-O2"],
        ),
        Extension(
            "fuzz._rng",
            ["fuzz/native/rng.c"],
            extra_compile_args=["-O2"],
        ),
    ],
)
