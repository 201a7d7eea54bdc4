"""The images the chart runs (deploy/docker/Dockerfile, Dockerfile.cpu), read as text: no
container engine exists here to build them. They install what pyproject.toml defines, run as
the non-root user the chart's pods expect, start `afd`, and the build context carries what
the build copies."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support.chart import CHART, ROOT

DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def pip_installs(path: Path) -> list[str]:
    """What each `pip install` of the build installs (the project as '.' or '.[extras]')."""
    runs = " && ".join(args for op, args in instructions(path) if op == "RUN")
    return re.findall(r"pip install [^&]*?('?\.(?:\[[a-z,]+\])?'?)(?:\s|$)", runs)


@pytest.fixture(scope="module")
def values():
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_the_gpu_image_installs_the_project_with_its_gpu_extra():
    (install,) = pip_installs(IMAGES["gpu"])
    extras = re.findall(r"\[([a-z,]+)\]", install)
    assert extras == ["gpu"]
    assert "gpu" in PROJECT["optional-dependencies"]
    (base,) = [a for op, a in instructions(IMAGES["gpu"]) if op == "ARG" and a.startswith("CUDA")]
    assert "nvidia/cuda" in base and "runtime" in base


def test_the_cpu_image_installs_the_project_over_torch_s_cpu_build_of_the_pinned_version():
    (install,) = pip_installs(IMAGES["cpu"])
    assert install.strip("'") == "."
    (pin,) = [d for d in PROJECT["dependencies"] if d.startswith("torch")]
    text = IMAGES["cpu"].read_text()
    assert f"TORCH_VERSION={pin.split('==')[1]}" in text  # the same torch the project pins
    assert "download.pytorch.org/whl/cpu" in text  # not PyPI's CUDA build (5.5 GB)


@pytest.mark.parametrize("image", list(IMAGES))
def test_each_image_runs_afd_as_the_chart_s_non_root_user(image, values):
    final = final_stage(IMAGES[image])
    (user,) = [a for op, a in final if op == "USER"]
    uid, gid = (int(x) for x in user.split(":"))  # numeric: runAsNonRoot can check it
    assert uid != 0 and gid != 0
    assert (uid, gid) == (
        values["podSecurityContext"]["runAsUser"],
        values["podSecurityContext"]["runAsGroup"],
    )
    (entrypoint,) = [a for op, a in final if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["afd"]
    assert "afd" in PROJECT["scripts"]  # the console script the entrypoint names
    env = " ".join(a for op, a in final if op == "ENV")
    assert "HOME=/tmp" in env  # writable under the chart's read-only root filesystem


@pytest.mark.parametrize("image", list(IMAGES))
def test_each_image_generates_the_grpc_stubs_with_the_makefile_s_recipe(image):
    runs = " ".join(a for op, a in instructions(IMAGES[image]) if op == "RUN")
    assert "make proto" in runs
    # before the project is installed, so the stubs are in the installed package
    install = re.search(r"pip install --no-cache-dir '?\.", runs)
    assert install and runs.index("make proto") < install.start()
    assert re.search(r"^proto:", (ROOT / "Makefile").read_text(), re.M)


def test_the_build_context_holds_what_the_build_needs_and_nothing_local():
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # an allow-list: nothing new slips in by default
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    # setuptools reads pyproject.toml and its readme; make proto needs the Makefile and proto/.
    assert kept == {"pyproject.toml", PROJECT["readme"], "Makefile", "proto", "services"}
    assert "services/common/wire/gen/" in ignore  # regenerated inside the image


def test_the_chart_s_default_image_is_this_version_of_the_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == PROJECT["version"]
