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


def project_requirements() -> list[Requirement]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + extras["mpi"] + extras["triton"]]


def test_every_runtime_dependency_is_pinned_inside_the_pyproject_range():
    pinned = pins()
    for req in project_requirements():
        if req.name == "torch":
            continue  # the base image's CUDA build, checked below
        assert req.name in pinned, f"{req.name} is a dependency but docker/Dockerfile does not pin it"
        assert req.specifier.contains(pinned[req.name]), (
            f"docker/Dockerfile pins {req.name}=={pinned[req.name]}, outside pyproject's {req.specifier}"
        )


def test_torch_comes_from_a_pinned_ngc_base_image():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.M)[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    installs = " ".join(re.findall(r"^RUN pip install(?:.*\\\n)*.*$", DOCKERFILE, re.M))
    assert "deepspeed==" in installs
    assert not re.search(r'"torch[=<>]', installs), "the image must not reinstall torch from PyPI"
    assert "pip install --no-deps -e ." in DOCKERFILE


def test_image_copies_every_package_the_project_installs():
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {pkg.rstrip('*')} " in DOCKERFILE, pkg
