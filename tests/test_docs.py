"""The architecture document's module map names every module of the project, so that a new
module cannot go unmentioned."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("kernel_emu", "fuzz", "corpus", "workers", "dashboard", "fuzzfarm")


def test_the_module_map_names_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"[\w/]+\.(?:py|pyi)\b", text))
    # a line may name siblings by their file name alone after the first: `app.py; settings.py`
    for line in text.splitlines():
        first = re.match(r"([\w/]+/)", line)
        if first:
            mapped |= {f"{first.group(1)}{name}"
                       for name in re.findall(r"\b(\w+\.(?:py|pyi))\b", line)}
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES
               for p in (ROOT / pkg).rglob("*.py*")
               if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
               and "guest" not in p.parts}
    missing = sorted(m for m in modules if m not in mapped
                     and not m.endswith("__main__.py"))
    assert not missing, f"docs/architecture.md does not name: {missing}"
