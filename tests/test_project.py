"""Project-level promises: the README's commands, CI running exactly them, and a safe code base."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("attribution_core", "app", "benchmarks", "sample_data")


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text())


def test_readme_quick_start_has_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("tdx app") and commands[1].endswith("pytest")
    assert all("pip install torch==2.13.0" in command for command in commands)


def test_ci_runs_the_readme_test_command_and_nothing_else_of_its_own():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == _readme_commands()[1]


def _python_sources():
    for directory in SOURCE_DIRS:
        yield from (ROOT / directory).rglob("*.py")


@pytest.mark.parametrize(
    "pattern",
    [r"\bimport pickle\b", r"\bpickle\.load", r"allow_pickle\s*=\s*True", r"torch\.load\((?![^)]*weights_only\s*=\s*True)"],
)
def test_no_code_path_can_unpickle(pattern):
    offenders = [str(path.relative_to(ROOT)) for path in _python_sources() if re.search(pattern, path.read_text())]
    assert offenders == []


def test_core_imports_no_streamlit():
    imports = re.compile(r"^\s*(import|from) streamlit\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "attribution_core").rglob("*.py") if imports.search(p.read_text())]
    assert offenders == []


def test_security_lint_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "--select", "S", *SOURCE_DIRS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _layer_of() -> dict[str, tuple[int, int]]:
    """Every core module (dotted under attribution_core, "" the package) -> (its layer, its sub-layer), from the declarations."""
    import importlib

    import attribution_core

    placed: dict[str, tuple[int, int]] = {}
    for depth, layer in enumerate(attribution_core.LAYERS):
        if not layer.package:
            placed |= {module: (depth, sub) for sub, modules in enumerate(layer.modules) for module in modules}
            continue
        sublayers = importlib.import_module(f"attribution_core.{layer.package}").LAYERS
        folder = ROOT / "attribution_core" / layer.package
        named = {module for modules in sublayers for module in modules}
        others = sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__" and path.stem not in named)
        for sub, modules in enumerate(sublayers):
            for module in (others if modules == ("*",) else modules):
                placed[".".join(filter(None, (layer.package, module)))] = (depth, sub)
    return placed


def _core_imports(path: Path) -> tuple[str, set[str]]:
    """(module name under attribution_core, the attribution_core modules it imports, lazily or not)."""
    import ast

    parts = list(path.relative_to(ROOT / "attribution_core").with_suffix("").parts)
    package = parts[:-1]
    module = ".".join(package if parts[-1] == "__init__" else parts)
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            targets.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attribution_core."):
            targets.add(node.module.removeprefix("attribution_core."))
    return module, targets - {module}


def test_core_modules_import_only_from_lower_layers():
    layer_of = _layer_of()
    found = dict(_core_imports(path) for path in (ROOT / "attribution_core").rglob("*.py"))
    assert set(found) == set(layer_of), "every core module needs a place in attribution_core.LAYERS or its package's LAYERS"
    upward = sorted(f"{module} imports {target}" for module, targets in found.items() for target in targets
                    if target in layer_of and layer_of[target] >= layer_of[module])
    assert upward == []


def test_readme_and_package_docstring_list_the_declared_layers():
    import attribution_core

    lines = attribution_core.layer_lines()
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):].split("\n## ", 1)[0]
    assert [line for line in lines if line not in layout] == []
    docstring = " ".join(attribution_core.__doc__.split())  # the docstring wraps its long lines
    assert [line for line in lines if " ".join(line.split()) not in docstring] == []


def test_old_import_paths_give_the_moved_modules_themselves():
    from attribution_core import recorder, run
    from attribution_core.runs import recorder as moved_recorder
    from attribution_core.runs import run as moved_run

    assert run is moved_run and recorder is moved_recorder
    from attribution_core.recorder import Recorder  # noqa: F401
    from attribution_core.run import Run  # noqa: F401 (the README's path)


def test_readme_states_the_torch_versions_pyproject_accepts():
    (floor,) = re.findall(r'^\s*"torch>=([\d.]+)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"any torch ≥ {floor} (pyproject.toml's `torch>={floor}`)" in readme
