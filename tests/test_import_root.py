"""One import root: the wheel installs only ``loraplex``, and its layers import downwards only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPY_SKIPS = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "results", "demo")

# Prints, as JSON, the modules that importing every submodule of the given packages brought in.
WALK = (
    "import sys, pkgutil, importlib, json\n"
    "for name in sys.argv[1:]:\n"
    "    pkg = importlib.import_module(name)\n"
    "    for m in pkgutil.walk_packages(pkg.__path__, name + '.'): importlib.import_module(m.name)\n"
    "print(json.dumps(sorted(sys.modules)))"
)


def imported_by(*packages: str) -> set[str]:
    # A neutral working directory: the repository root on sys.path would make router/ importable as `router`.
    proc = subprocess.run([sys.executable, "-c", WALK, *packages], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def under(modules: set[str], *roots: str) -> set[str]:
    return {m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)}


def test_wheel_holds_the_one_top_level_package(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ behind, whose stale modules a later build would package.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*COPY_SKIPS))
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), src],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("loraplex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"loraplex"}
    # The three folders at the top of the tree arrive under the root, with the kernel source and the stubs.
    for path in (
        "loraplex/router/main.py",
        "loraplex/shard/main.py",
        "loraplex/kernels/lora_sgmv.cu",
        "loraplex/proto/v1/generate_pb2.py",
        "loraplex/proto/shard/v1/shard_pb2_grpc.py",
    ):
        assert path in names, path
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:  # setuptools writes it; what it lists is what importlib.metadata maps names to
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["loraplex"]


@pytest.mark.parametrize("name", ["kernels", "router", "shard"])
def test_generic_names_are_not_ours(name: str) -> None:
    """transformers probes `kernels` (Hugging Face's kernel hub): it must not find this project under it."""
    code = (
        "import importlib.metadata as md, importlib.util as u, json, sys\n"
        f"spec = u.find_spec({name!r})\n"
        f"print(json.dumps([spec.origin if spec else None, md.packages_distributions().get({name!r}, [])]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    origin, dists = json.loads(proc.stdout)
    assert "loraplex" not in dists
    assert origin is None or not str(origin).startswith(str(ROOT)), origin


def test_router_imports_no_shard_kernels_or_torch() -> None:
    modules = imported_by("loraplex.router", "loraplex.proto")
    assert "loraplex.router.main" in modules and "loraplex.proto.shard.v1.shard_pb2_grpc" in modules
    assert not under(modules, "loraplex.shard", "loraplex.kernels", "torch", "transformers", "cupy")


def test_common_helpers_import_neither_side() -> None:
    modules = imported_by("loraplex.common")
    assert "loraplex.common.flags" in modules
    assert not under(modules, "loraplex.router", "loraplex.shard", "loraplex.kernels", "torch")


def test_kernels_import_nothing_of_the_shard() -> None:
    modules = imported_by("loraplex.kernels")
    assert "loraplex.kernels.reference" in modules
    assert not under(modules, "loraplex.shard", "loraplex.router")
