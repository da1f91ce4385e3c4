"""One door to Redis: only the store modules (`workers/store/`) import the Redis client, spell a
key (`ff:...`) or hold a client. Every other module of the farm goes through
`workers.store.FarmStore` and catches `StoreError`/`StoreUnavailable`; Celery and Kombu use
Redis inside themselves, which is theirs."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("workers", "dashboard", "fuzzfarm", "fuzz", "kernel_emu", "corpus")
STORE = ROOT / "workers" / "store"
KEY_PREFIX = "ff:"
# how the store modules hold their client: reaching for one of these elsewhere bypasses them
CLIENT_ATTRIBUTES = {"r", "_r", "_conn"}


@dataclass(frozen=True)
class Breach:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _breaches(path: Path) -> list[Breach]:
    """Everything in one module that only a store module may do."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in modules:
            if name.split(".")[0] == "redis":
                out.append(Breach(rel, node.lineno, f"imports {name}"))
            elif name.startswith("workers.store.") and \
                    name.split(".")[2] in {p.stem for p in STORE.glob("*.py")}:
                out.append(Breach(rel, node.lineno, f"imports the store's module {name}"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith(KEY_PREFIX):
            out.append(Breach(rel, node.lineno, f"spells the key {node.value!r}"))
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(
                node.values[0], ast.Constant) and str(node.values[0].value).startswith(
                KEY_PREFIX):
            out.append(Breach(rel, node.lineno, "spells a key in an f-string"))
        if isinstance(node, ast.Attribute) and node.attr in CLIENT_ATTRIBUTES:
            out.append(Breach(rel, node.lineno, f"reaches for a client (.{node.attr})"))
    return out


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if "guest" not in p.relative_to(ROOT).parts)


def test_only_the_store_modules_talk_to_redis() -> None:
    outside = [p for p in _modules() if STORE not in p.parents]
    assert len(outside) > 50  # the whole farm was looked at
    found = [str(b) for p in outside for b in _breaches(p)]
    assert found == [], "go through workers.store.FarmStore instead:\n" + "\n".join(found)


def test_the_check_sees_what_the_store_modules_do() -> None:
    """The same check run on the store itself finds the client and the keys there, so it
    can find them anywhere."""
    inside = {p.stem: {b.what for b in _breaches(p)} for p in STORE.glob("*.py")}
    assert "imports redis" in inside["connection"]
    assert "spells the key 'ff:buckets'" in inside["buckets"]
    assert "spells the key 'ff:campaign:'" in inside["campaigns"]
    assert any(w.startswith("reaches for a client") for w in inside["stats"])
    assert "imports the store's module workers.store.blobs" in inside["__init__"]
