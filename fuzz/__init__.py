"""Fuzzing harness: Atheris campaigns over the emulated boot."""
