"""A Dockerfile's build stage played on this machine (no Docker engine here): its COPYs through the build
context filter, then its RUNs, to get the wheel the image installs."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from configparser import ConfigParser
from pathlib import Path

from tests.deploy.support import ROOT
from tests.deploy.test_drift import dockerfile_instructions


def build_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the first stage (the one that builds the wheel)."""
    instructions = dockerfile_instructions(dockerfile)
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[0] : starts[1]]


def ignore_rules(dockerfile: Path) -> list[tuple[str, bool]]:
    """(pattern, includes) from ``<Dockerfile>.dockerignore``, in order: the last that matches a path wins."""
    lines = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [(rule.removeprefix("!"), rule.startswith("!")) for rule in rules]


def in_context(rel: str, rules: list[tuple[str, bool]]) -> bool:
    """Whether the build context holds ``rel``; a pattern that matches a folder matches what is under it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern, includes in rules:
        glob = pattern.replace("**", "*")
        if any(fnmatch.fnmatchcase(p, glob) for p in prefixes):
            included = includes
    return included


def copy_source(source: Path, target: Path, rules: list[tuple[str, bool]]) -> None:
    """One COPY source as Docker copies it: a folder's contents (links kept as links), or the file."""
    if not source.is_dir() or source.is_symlink():
        assert in_context(source.relative_to(ROOT).as_posix(), rules), f"{source} is not in the build context"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    for folder, dirs, files in os.walk(source):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if (path.is_dir() and not path.is_symlink()) or not in_context(path.relative_to(ROOT).as_posix(), rules):
                continue
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                dest.symlink_to(os.readlink(path))
            else:
                shutil.copy2(path, dest)


def play_build_stage(dockerfile: Path, workdir: Path) -> Path:
    """COPY and RUN as the build stage does (its tool install aside: they are this venv's), in ``workdir``;
    returns the wheel it built."""
    rules = ignore_rules(dockerfile)
    wheels = workdir / "wheels"
    for op, args in build_stage(dockerfile):
        if op == "COPY":
            *sources, dest = args.split()
            assert not dest.startswith("/"), "the stage copies under its WORKDIR"
            for source in sources:
                into = dest.endswith("/") or len(sources) > 1
                target = workdir / dest / Path(source).name if into and not (ROOT / source).is_dir() else workdir / dest
                copy_source(ROOT / source, target, rules)
        elif op == "RUN" and not args.startswith("pip install"):
            command = args.replace("/wheels", str(wheels))
            command = re.sub(r"\bpip (wheel|install)\b", rf"{sys.executable} -m pip \1", command)
            command = re.sub(r"(^|&& )python ", rf"\g<1>{sys.executable} ", command)
            done = subprocess.run(
                ["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=300, check=False
            )
            assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("*.whl")
    return wheel


def console_scripts(wheel: Path) -> dict[str, str]:
    """Script name → ``module:function`` from the wheel's entry points."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = ConfigParser()
        parser.read_string(z.read(name).decode())
    return dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}


def wheel_modules(wheel: Path) -> dict[str, str]:
    """Dotted module name → source text of every Python module and package the wheel installs."""
    modules = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith(".py") and ".dist-info/" not in name:
                dotted = name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                modules[dotted] = z.read(name).decode()
    # Folders without __init__.py (the stubs' namespace packages) are importable packages too.
    for dotted in list(modules):
        parts = dotted.split(".")
        for i in range(1, len(parts)):
            modules.setdefault(".".join(parts[:i]), "")
    return modules
