"""docker/Dockerfile cannot be built here (no Docker engine); check what can be checked statically."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE)}


# What each NGC PyTorch tag ships (NVIDIA's PyTorch release notes, "PyTorch container image version
# YY.MM is based on ..."): torch, triton and numpy are the image's, never reinstalled.
NGC_TORCH = {"25.01": "2.6.0", "25.12": "2.10.0"}
FROM_BASE_IMAGE = {"torch", "triton", "numpy"}


def project_requirements() -> list[Requirement]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + extras["mpi"] + extras["triton"]]


def test_every_runtime_dependency_is_pinned_inside_the_pyproject_range():
    pinned = pins()
    for req in project_requirements():
        if req.name in FROM_BASE_IMAGE:
            assert req.name not in pinned, f"{req.name} comes from the base image; do not pin it"
            continue
        assert req.name in pinned, f"{req.name} is a dependency but docker/Dockerfile does not pin it"
        assert req.specifier.contains(pinned[req.name]), (
            f"docker/Dockerfile pins {req.name}=={pinned[req.name]}, outside pyproject's {req.specifier}"
        )


def test_torch_triton_numpy_come_from_a_pinned_ngc_base_image_inside_our_ranges():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.M)[1]
    tag = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d\.\d\d)-py3", base)
    assert tag, base
    assert tag[1] in NGC_TORCH, f"add the torch version NGC {tag[1]} ships to NGC_TORCH"
    torch_req = next(r for r in project_requirements() if r.name == "torch")
    assert torch_req.specifier.contains(NGC_TORCH[tag[1]], prereleases=True), (
        f"NGC {tag[1]} ships torch {NGC_TORCH[tag[1]]}, outside pyproject's {torch_req.specifier}"
    )
    assert tag[1] >= "25.03", "images before 25.03 have no /etc/pip/constraint.txt"
    installs = " ".join(re.findall(r"^RUN pip install(?:.*\\\n)*.*$", DOCKERFILE, re.M))
    assert "deepspeed==" in installs and "-c /etc/pip/constraint.txt" in installs
    for name in FROM_BASE_IMAGE:
        assert not re.search(rf'"{name}[=<>]', installs), f"the image must not reinstall {name} from PyPI"
    assert "pip install --no-deps -e ." in DOCKERFILE


def test_image_copies_every_package_the_project_installs():
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {pkg.rstrip('*')} " in DOCKERFILE, pkg
