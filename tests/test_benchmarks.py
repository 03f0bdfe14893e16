"""Every benchmark script runs in its smoke mode, so a change that breaks a benchmark fails the suite (issue 26 item 7).

A script is a file of benchmarks/ that runs as a program (`if __name__ == "__main__":`); the others
(common.py, anchors.py) are its helpers. Each script is run as `python benchmarks/<script> --smoke
--json PATH` and must exit 0, print a markdown table, write JSON whose top-level keys are the ones
its JSON_KEYS declares, and leave benchmarks/RESULTS.md as it was. The convention is written at the
top of benchmarks/common.py.

BY_HAND names the scripts whose smoke run costs too much for every run of the suite, and why; the
suite checks only that they import and take --smoke (`--smoke --help`), and they are run by hand.

The selected scripts start when the first of these tests runs, CONCURRENT at a time, each on one
thread; each test then waits for its own script. Smoke runs spend much of their time starting Python
and waiting on subprocesses and the disk (B6 computes a fifth of its time), so two run beside each other.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "RESULTS.md"
SCRIPT_SECONDS = 300
"""The most one smoke run may take on a loaded 2-core machine (they take 5-100 s there)."""
CONCURRENT = 2
BY_HAND = {
    "app_latency": "its smoke run starts tdx train, tdx app twice (Streamlit and two job workers each) and Chromium: 75-160 s "
                   "on a loaded 2-core machine, 40 s of CPU; tests/browser drive the same app and pages",
}
"""Scripts whose smoke run the suite leaves to a person (`python benchmarks/<script> --smoke`), and why."""
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Smoke runs' tensors are tiny: a second thread per process only spins against the other processes."""

pytestmark = pytest.mark.slow


def scripts() -> list[Path]:
    """The benchmark scripts: the files of benchmarks/ that run as programs."""
    return sorted(path for path in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in path.read_text())


def smoke_scripts() -> list[Path]:
    """The scripts whose smoke run the suite runs: all but BY_HAND."""
    return [script for script in scripts() if script.stem not in BY_HAND]


def declared_json_keys(script: Path) -> tuple[str, ...]:
    """The script's module-level JSON_KEYS, read from its source (nothing of it is imported)."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == "JSON_KEYS" for target in node.targets):
            return tuple(ast.literal_eval(node.value))
    pytest.fail(f"{script.name} declares no JSON_KEYS, the top-level keys of its --json output (see benchmarks/common.py)")


def run_script(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> arguments...` from the repository root; its process group is killed if it overruns."""
    command = [sys.executable, str(script.relative_to(ROOT)), *arguments]
    process = subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=SCRIPT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the script and whatever it started in its group
        output, _ = process.communicate()
        output += f"\n[killed after {SCRIPT_SECONDS} s]"
    return subprocess.CompletedProcess(command, process.returncode, output)


def selected_scripts(request) -> list[Path]:
    """The scripts whose smoke test this run of the suite selected."""
    callspecs = (getattr(item, "callspec", None) for item in request.session.items if item.module is request.module)
    return [callspec.params["script"] for callspec in callspecs if callspec is not None and "script" in callspec.params]


@pytest.fixture(scope="module")
def results_before() -> bytes:
    """benchmarks/RESULTS.md before any smoke run started."""
    return RESULTS.read_bytes()


@pytest.fixture(scope="module")
def smoke_runs(request, results_before, tmp_path_factory) -> Iterator[dict[Path, tuple[Future, Path]]]:
    """{script: (its smoke run, the JSON path it writes)} for every selected script, started CONCURRENT at a time."""
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        runs = {}
        for script in selected_scripts(request):
            json_path = tmp_path_factory.mktemp(script.stem) / "out.json"
            runs[script] = (pool.submit(run_script, script, "--smoke", "--json", str(json_path)), json_path)
        yield runs
        for future, _ in runs.values():
            future.cancel()  # those not started yet, when a run of the suite stops early


def test_the_benchmark_folder_has_scripts_and_by_hand_names_only_scripts():
    names = {script.stem for script in scripts()}
    assert names >= {"b1_digits_lds", "b3_speed", "bad_inputs"}
    assert set(BY_HAND) <= names


@pytest.mark.timeout(SCRIPT_SECONDS + 60)
@pytest.mark.parametrize("script", smoke_scripts(), ids=lambda script: script.stem)
def test_smoke_run_exits_cleanly_with_its_table_and_documented_json_and_leaves_results_alone(script, smoke_runs, results_before):
    expected_keys = declared_json_keys(script)
    future, json_path = smoke_runs[script]

    result = future.result()

    assert result.returncode == 0, f"{script.name} --smoke exited {result.returncode}:\n{result.stdout[-4000:]}"
    assert "|---|" in result.stdout, f"{script.name} --smoke printed no markdown table:\n{result.stdout[-2000:]}"
    assert sorted(json.loads(json_path.read_text())) == sorted(expected_keys)
    assert RESULTS.read_bytes() == results_before, "a smoke run (this one or one beside it) changed benchmarks/RESULTS.md"


@pytest.mark.timeout(SCRIPT_SECONDS + 60)
@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_scripts_run_by_hand_import_and_take_smoke(name):
    result = run_script(BENCHMARKS / f"{name}.py", "--smoke", "--help")

    assert result.returncode == 0, result.stdout[-4000:]
    assert "--smoke" in result.stdout
