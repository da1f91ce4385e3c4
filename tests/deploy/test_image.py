"""The Dockerfile: a compiler-free, non-root runtime holding the package with its kernel images.

No Docker engine is needed: the instructions are read, and the wheel the build stage makes is
built here from the same build context (.dockerignore applied) and inspected."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.compose import DOCKERFILE, DOCKERIGNORE, ROOT

PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
BASE = "python:3.11-slim-bookworm"
# what a web application reads from its package at run time
SERVED = {".py", ".html", ".jinja", ".j2", ".css", ".js", ".svg", ".png", ".ico", ".json"}
COMPILERS = {"gcc", "g++", "cpp", "clang", "build-essential", "make", "libc6-dev"}


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    body: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.body if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARGs declared before the first FROM, stages); continuation lines are joined."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: global_args.get(m.group(1) or m.group(2), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, []))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].body.append(Instruction(keyword, args))
    return global_args, stages


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _apt_packages(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", run):
            words = part.split()
            if "apt-get" in words and "install" in words:
                packages |= {w for w in words[words.index("install") + 1:]
                             if not w.startswith("-")}
    return packages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return parsed


def test_stages_are_debian_12_python_3_11(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a build stage with gcc, then a runtime without it"
    for stage in stages:
        assert stage.image == BASE, stage.image


def test_compilers_stay_in_the_build_stage(stages: list[Stage]) -> None:
    build, runtime = stages[0], stages[-1]
    assert "gcc" in _apt_packages(build)
    assert not _apt_packages(runtime) & COMPILERS
    # symbols are demangled by a pinned Python library: no system tool decides a signature
    assert not _apt_packages(runtime), "the runtime needs no system packages"
    assert any(f"--from={build.name}" in copy for copy in runtime.all("COPY")) or any(
        f"from={build.name}" in run for run in runtime.all("RUN"))


def test_the_runtime_installs_the_package_from_the_build_stage_only(
        stages: list[Stage]) -> None:
    installs = [run for run in stages[-1].all("RUN") if "pip install" in run]
    assert installs
    for run in installs:
        assert "--no-index" in run, "nothing is fetched from an index in the runtime stage"
    assert any(PYPROJECT["project"]["name"] in run for run in installs)
    for run in stages[-1].all("RUN"):
        assert not re.search(r"\b(curl|wget)\b", run)


def test_the_runtime_runs_as_a_user_and_by_default_harmlessly(stages: list[Stage]) -> None:
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, ins in enumerate(runtime.body) if ins.keyword == "USER")
    assert all(ins.keyword != "RUN" for ins in runtime.body[last_user:])
    # compose gives each service its command; an ENTRYPOINT would be prefixed to it
    assert not runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    words = _exec_form(cmd)
    assert not {"curl", "wget"} & set(words)
    assert words[0] in PYPROJECT["project"]["scripts"]
    run = subprocess.run([str(Path(sys.executable).parent / words[0]), *words[1:]],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _ignore_patterns() -> list[str]:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not modelled here"
    return patterns


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return True  # a matching directory excludes everything under it
    return False


def _build_copies(stage: Stage) -> list[tuple[list[str], str]]:
    copies = []
    for args in stage.all("COPY"):
        words = [w for w in _exec_form(args) if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def test_the_build_context_holds_the_packages_and_their_data(stages: list[Stage]) -> None:
    patterns = _ignore_patterns()
    for needless in (".venv", "out", "build", ".git"):
        assert _ignored(needless, patterns), needless
    assert _ignored("kernel_emu/_tracer.cpython-311-x86_64-linux-gnu.so", patterns)
    assert _ignored("workers/__pycache__/app.cpython-311.pyc", patterns)
    copied = {src.rstrip("/") for sources, _ in _build_copies(stages[0]) for src in sources}
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()
                and any(fnmatch.fnmatchcase(d.name, pattern) for pattern in include)}
    assert {"kernel_emu", "fuzz", "corpus", "workers", "dashboard", "fuzzfarm"} <= packages
    needed = {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"], *packages}
    assert needed <= copied, f"not copied into the build stage: {needed - copied}"
    for rel in needed:
        assert not _ignored(rel, patterns), f"{rel} is excluded from the build context"
    assert "*.elf" in PYPROJECT["tool"]["setuptools"]["package-data"]["*"]
    elfs = sorted(p.name for p in (ROOT / "kernel_emu" / "images").glob("*.elf"))
    assert {"seed.elf", "fixed.elf"} <= set(elfs)
    for name in elfs:
        assert not _ignored(f"kernel_emu/images/{name}", patterns)


def _context_copy(stage: Stage, into: Path) -> None:
    """The files the build stage's COPY instructions take, laid out as in its WORKDIR."""
    patterns = _ignore_patterns()
    for sources, dest in _build_copies(stage):
        where = into / dest.removeprefix("./").strip("/")
        for src in sources:
            path = ROOT / src
            if path.is_file():
                # several sources, or a destination ending in '/', name a directory
                target = where / path.name if dest.endswith("/") or len(sources) > 1 else where
                pairs = [(path, target)]
            else:
                # a directory's contents land in the destination
                pairs = [(f, where / f.relative_to(path)) for f in sorted(path.rglob("*"))
                         if f.is_file()]
            for f, target in pairs:
                if _ignored(f.relative_to(ROOT).as_posix(), patterns):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


@pytest.fixture(scope="module")
def wheel(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built as the build stage builds it, from the same context."""
    tmp = tmp_path_factory.mktemp("image")
    context, wheels = tmp / "context", tmp / "wheels"
    _context_copy(stages[0], context)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                            "--wheel-dir", str(wheels), str(context)],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = wheels.glob("*.whl")
    return built


def test_the_build_stage_wheel_holds_the_images_and_native_hooks(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in ("seed.elf", "fixed.elf", "manifest.json", "seed.efi", "seed.map",
                     "seed.debug", "fixed.efi", "fixed.map", "fixed.debug", "rxboot.efi"):
            member = f"kernel_emu/images/{name}"
            assert member in names
            assert z.read(member) == (ROOT / member).read_bytes()
        for profile in ("seed", "fixed", "seed-elf", "fixed-elf"):
            assert f"kernel_emu/profiles/{profile}.toml" in names
        for ext in ("kernel_emu/_tracer", "kernel_emu/_walk", "fuzz/_feedback", "fuzz/_rng"):
            assert any(n.startswith(ext) and n.endswith(".so") for n in names), ext
        assert any(n.startswith("corpus/seeds/") for n in names)
        assert any(n.startswith("fuzzfarm/examples/") for n in names)
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "fuzzfarm = fuzzfarm.cli:main" in z.read(entry_points).decode()


def test_the_wheel_holds_what_the_dashboard_serves(wheel: Path) -> None:
    # the image has only the wheel: templates and assets must be package data, not just
    # files in the repository
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    patterns = _ignore_patterns()
    missing = sorted(rel for f in (ROOT / "dashboard").rglob("*")
                     if f.is_file() and f.suffix in SERVED
                     and not _ignored(rel := f.relative_to(ROOT).as_posix(), patterns)
                     and rel not in names)
    assert not missing, f"not in the wheel (pyproject package-data): {missing}"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> list[str]:
    # extras' requirements are not installed in the image
    return [_normalize(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0])
            for r in requirements if "extra ==" not in r.replace('"', "").replace("'", "")]


def _imported_modules(packages: list[str]) -> dict[str, str]:
    """Top-level modules the packages import, with a file importing each."""
    found: dict[str, str] = {}
    for package in packages:
        for f in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                         and node.module else [])
                for name in names:
                    found.setdefault(name.split(".")[0], f.relative_to(ROOT).as_posix())
    return found


def test_every_third_party_import_is_a_declared_dependency(wheel: Path) -> None:
    """The runtime stage installs the wheel's dependencies and nothing else: a module that is
    only in the developer's venv would be missing in the containers."""
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist()
                               if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    installable = set()
    todo = _requirement_names(requires)
    while todo:
        name = todo.pop()
        if name in installable:
            continue
        installable.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += _requirement_names(importlib.metadata.requires(name) or [])
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, where in _imported_modules(packages).items():
        if module in sys.stdlib_module_names or module in packages or module == "__future__":
            continue
        dists = {_normalize(d) for d in providers.get(module, [])}
        if not dists & installable:
            undeclared[module] = where
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
