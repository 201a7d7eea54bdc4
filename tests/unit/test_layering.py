"""Dependencies point one way: services -> common, never sideways, and the gateway's share
of common (tokenizer, sampling parameters, config) stays free of torch, as does the bench
client, which runs wherever the load is generated, and the planner (`afd plan`), which runs
wherever a deployment is decided."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("attention", "ffn", "gateway", "bench", "planner")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_only_itself_and_common(service):
    others = {f"services.{s}" for s in SERVICES if s != service}
    for path in (ROOT / "services" / service).rglob("*.py"):
        for module in imported_modules(path):
            assert not any(module == o or module.startswith(o + ".") for o in others), (
                f"{path.relative_to(ROOT)} imports {module}"
            )


def test_common_imports_no_service():
    for path in (ROOT / "services" / "common").rglob("*.py"):
        for module in imported_modules(path):
            assert not any(module.startswith(f"services.{s}") for s in SERVICES), (
                f"{path.relative_to(ROOT)} imports {module}"
            )


def test_gateway_side_of_common_does_not_load_torch():
    modules = [
        "services.gateway",
        "services.bench.runner",
        "services.bench.report",
        "services.bench.plot",
        "services.common.config",
        "services.common.sampling_params",
        "services.common.tokenizer",
        "services.common.detokenizer",
        "services.common.engine_output",
        "services.common.text_stream",
        "services.common.completion",
        "services.common.wire.attention_aio",
        "services.common.presets",
        "services.common.model.schema",
    ]
    assert not loads_torch(modules)


def test_the_planner_does_not_load_torch():
    planner = sorted(
        f"services.planner.{p.stem}" for p in (ROOT / "services/planner").glob("[!_]*.py")
    )
    assert not loads_torch([*planner, "services.cli.plan"])


def loads_torch(modules: list[str]) -> bool:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


@pytest.mark.parametrize(
    "command",
    [["bench", "--help"], ["gateway", "--help"], ["--help"], ["plan", "deploy", "--help"]],
)
def test_commands_that_need_no_torch_do_not_load_it(command):
    # The gateway's processes and the load generator stay small and start fast.
    code = (
        "import sys\nfrom services.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_the_kernels_know_no_model():
    """services/common/kernels sits below the model: layers import kernels, never back."""
    for path in (ROOT / "services/common/kernels").rglob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith("services.common.model"), (
                f"{path.relative_to(ROOT)} imports {module}"
            )


E4M3_MAX = re.compile(r"448\.0|/\s*448\b")  # 448 as a float or a divisor, not a bucket size


def test_the_e4m3_maximum_is_written_once():
    """FP8_MAX lives in services/common/kernels/fp8.py; everyone else imports it."""
    owner = ROOT / "services/common/kernels/fp8.py"
    for path in (ROOT / "services").rglob("*.py"):
        if path == owner:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not E4M3_MAX.search(code) and "FP8_MAX =" not in code, (
                f"{path.relative_to(ROOT)}:{number} writes the e4m3 maximum: import FP8_MAX"
            )
