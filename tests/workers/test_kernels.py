"""A kernel build's profile as workers get it: the user's TOML with its image renamed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kernel_emu.profile import PROFILE_DIR
from workers.kernels import STORED_IMAGE, KernelError, stored_profile


def test_only_the_image_changes_in_the_builtin_profiles() -> None:
    for name in ("seed", "fixed"):
        path = PROFILE_DIR / f"{name}.toml"
        text = path.read_text()
        stored = stored_profile(text, path)
        changed = [(a, b) for a, b in zip(text.splitlines(), stored.splitlines(), strict=True)
                   if a != b]
        assert changed == [(f'image = "../images/{name}.elf"', f'image = "{STORED_IMAGE}"')]
        assert tomllib.loads(stored) == {**tomllib.loads(text), "image": STORED_IMAGE}


def test_comments_layout_and_odd_spellings_survive() -> None:
    text = ('# my build\nname = "mine"  # the name\n\nimage   =   \'out/k.elf\'\n'
            'description = """two\nlines"""\n\n[heap]\nbase = 0x300000 # heap\n')
    stored = stored_profile(text, Path("mine.toml"))
    assert "# my build" in stored and "# the name" in stored and "# heap" in stored
    assert "base = 0x300000" in stored and '"""two\nlines"""' in stored
    assert tomllib.loads(stored)["image"] == STORED_IMAGE


def test_an_image_key_in_a_table_is_not_the_profile_s_image() -> None:
    text = 'name = "x"\n\n[notes]\nimage = "a picture"\n'
    with pytest.raises(KernelError, match="no top-level image"):
        stored_profile(text, Path("x.toml"))


def test_a_profile_that_is_no_toml_is_refused_in_one_line() -> None:
    with pytest.raises(KernelError, match="x.toml"):
        stored_profile('name = "x"\nimage = \n', Path("x.toml"))
