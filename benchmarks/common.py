"""Shared benchmark helpers: the common command line, run sizes, anchors, timing, markdown tables and RESULTS.md sections.

The convention every script in this folder follows (a new one too: tests/test_benchmarks.py runs
each script it finds here with --smoke, so a script that breaks, or has no smoke mode, fails the suite):

- its docstring's first line is its title; its last line shows the command with its options;
- `args = parser(__doc__.splitlines()[0]).parse_args()` (add the script's own options before parsing):
  every script takes --quick (a smaller version), --smoke (tiny sizes, seconds: what the suite runs),
  --json PATH, --workspace DIR and --no-results;
- sizes come from `by_mode(args, full=..., quick=..., smoke=...)`; data and models go through
  `shrunk(args, data, model)` (or `sized_model(args, model)`), which apply `smoke_data` and
  `smoke_model` on a smoke run and change nothing otherwise, so a smoke run calls the same
  functions as a full run, on less data, with narrower models and fewer subsets, queries or trials;
- anchor libraries (traker, kronfluence) are used only where `anchors_available()` says so: it prints
  a note and their rows are skipped when they are not installed (`pip install -e .[bench]`);
- `JSON_KEYS`, a module-level tuple of string literals, names the top-level keys of the JSON it
  writes (the suite checks them);
- it ends with `report(name, title, body, args, payload)`: prints the markdown table, writes the
  JSON, and replaces its own section of benchmarks/RESULTS.md, headed by the date, the machine, the
  library versions and the exact command, on full runs only (never with --quick, --smoke or
  --no-results: a smoke run must not change the results file).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from attribution_core.data import FASHION_MNIST_DIR, DataSpec
from attribution_core.models import ModelSpec
from attribution_core.runs.demo import demo_runs
from attribution_core.runs.run import Recipe
from attribution_core.store import atomic_write_bytes, file_lock

RESULTS = Path(__file__).with_name("RESULTS.md")
ANCHORS = {"traker": "trak", "kronfluence": "kronfluence"}
"""The anchor libraries: package name (what pip installs) -> module name (what Python imports)."""

SMOKE_TRAIN, SMOKE_TEST = 256, 32
"""Training and test examples of every data set a smoke run trains on (at least four batches of 64 an epoch)."""
SMOKE_WIDTH = 32
"""Width of every hidden layer of a smoke run's models. Wide enough that a Fashion-MNIST model keeps more than 20,000
parameters, so the exact influence method's limit leaves out the same models as at full size (its explicit Hessian
takes minutes just under the limit), and the digits MLP stays under it, as at full size."""
SMOKE_CHANNELS = [8, 16]
"""Channels of a smoke run's CNN (its hidden layer then has 16 x 7 x 7 x SMOKE_WIDTH > 20,000 weights)."""

T = TypeVar("T")


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: --quick or --smoke, --json, --workspace, --no-results."""
    result = argparse.ArgumentParser(description=description)
    size = result.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller, faster version")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, seconds: checks the script still runs (the test suite runs it); RESULTS.md is left alone")
    result.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON to this path")
    result.add_argument("--workspace", type=Path, default=None,
                        help="workspace directory (default: a fresh temporary one; an existing one reuses stored results)")
    result.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    return result


def by_mode(args: argparse.Namespace, *, full: T, quick: T, smoke: T) -> T:
    """The value for this run's size: --smoke, --quick or neither (a full run)."""
    if args.smoke:
        return smoke
    return quick if args.quick else full


def smoke_data(data: DataSpec) -> DataSpec:
    """The data set cut to SMOKE_TRAIN training and SMOKE_TEST test examples (same source, split and label noise)."""
    return replace(data, max_train=min(data.max_train or SMOKE_TRAIN, SMOKE_TRAIN), max_test=min(data.max_test or SMOKE_TEST, SMOKE_TEST))


def smoke_model(model: ModelSpec) -> ModelSpec:
    """The project's MLP (same depth) or CNN, narrowed to SMOKE_WIDTH and SMOKE_CHANNELS; any other model as it is."""
    if model.name == "mlp":
        return ModelSpec("mlp", {"hidden": [SMOKE_WIDTH] * len(model.options.get("hidden", [128]))})
    if model.name == "cnn":
        return ModelSpec("cnn", {"channels": list(SMOKE_CHANNELS), "hidden": SMOKE_WIDTH})
    return model


def sized_model(args: argparse.Namespace, model: ModelSpec) -> ModelSpec:
    """The model as given, or narrowed by smoke_model on a smoke run."""
    return smoke_model(model) if args.smoke else model


def shrunk(args: argparse.Namespace, data: DataSpec, model: ModelSpec) -> tuple[DataSpec, ModelSpec]:
    """(data, model) as given, or cut by smoke_data and smoke_model on a smoke run."""
    return (smoke_data(data) if args.smoke else data), sized_model(args, model)


def demo_run(args: argparse.Namespace, run_id: str, *, tiny: bool) -> tuple[DataSpec, ModelSpec, Recipe]:
    """(data, model, recipe) of one of the demo's runs: the tiny demo's when asked or on a smoke run, then cut by `shrunk`."""
    run = next(run for run in demo_runs(tiny=tiny or args.smoke) if run.run_id == run_id)
    return (*shrunk(args, run.data, run.model), run.recipe)


def fashion_mnist(max_train: int | None, args: argparse.Namespace) -> tuple[DataSpec, str]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist files, else the shipped sample (always on a smoke run), and a note saying which."""
    if args.smoke:
        return DataSpec(source="sample", max_train=max_train), "the shipped Fashion-MNIST sample (a smoke run)"
    if Path(FASHION_MNIST_DIR).exists():
        return DataSpec(source="fashion_mnist", max_train=max_train), "Fashion-MNIST: the Debian package's files"
    return DataSpec(source="sample", max_train=max_train), f"the shipped Fashion-MNIST sample (no files in {FASHION_MNIST_DIR})"


def add_workers_option(arguments: argparse.ArgumentParser, default: int) -> None:
    """Add --workers, the processes retraining ground truths: `default` on full and quick runs, 1 on a smoke run."""
    arguments.add_argument("--workers", type=int, default=None,
                           help=f"processes retraining the ground truth (default {default}; "
                                "1 with --smoke, whose retrainings take milliseconds)")
    arguments.set_defaults(default_workers=default)


def workers(args: argparse.Namespace) -> int:
    """The processes retraining ground truths: --workers, else its default for this run's size (see add_workers_option)."""
    return args.workers or (1 if args.smoke else args.default_workers)


@contextlib.contextmanager
def workspace_root(path: Path | None) -> Iterator[Path]:
    """The given workspace directory, or a temporary one removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tdx-bench-") as directory:
        yield Path(directory)


@dataclass
class Stopwatch:
    """Seconds elapsed inside a `timed()` block."""

    seconds: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Stopwatch]:
    """Time a block: `with timed() as clock: ...; clock.seconds`."""
    clock = Stopwatch()
    started = time.perf_counter()
    try:
        yield clock
    finally:
        clock.seconds = time.perf_counter() - started


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are printed with three decimals."""
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def anchors_available() -> bool:
    """Whether both anchor libraries can be imported (checked without importing them); prints a note when not (their rows are skipped)."""
    missing = [package for package, module in ANCHORS.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"anchors skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')", flush=True)
    return not missing


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line naming the hardware the numbers were measured on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cores}-core {_cpu_name()}{gpu}, {platform.system()} {platform.release()}"


LOAD_AT_START = os.getloadavg()[0]


def load() -> str:
    """The machine's 1-minute load average when the benchmark started and now: timings on a busy machine are slower."""
    return f"load average {LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"


def versions() -> str:
    """Python, torch, numpy and, where installed, the anchor libraries."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"numpy {np.__version__}"]
    for package in ("cleanlab", *ANCHORS):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package} {version(package)}")
    return ", ".join(parts)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(RESULTS.parent.parent)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, headed by date, machine, versions, command."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"{begin}\n## {title}\n\n- date: {stamp}\n- machine: {machine()}; {load()}\n- versions: {versions()}\n"
               f"- command: `{command_line()}`\n\n{body.strip()}\n{end}")
    with file_lock(RESULTS.with_name(".RESULTS.md.lock")):  # several benchmarks may finish at once
        text = (RESULTS.read_text() if RESULTS.exists()
                else "# Benchmark results\n\nWritten by the scripts in this folder; each replaces its own section.\n")
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        atomic_write_bytes(RESULTS, text.encode())


def report(name: str, title: str, body: str, args: argparse.Namespace, payload: dict) -> None:
    """Print the table, write the JSON if asked, and update RESULTS.md (full runs only: never --quick, --smoke or --no-results)."""
    print(body)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True))
    if not (args.quick or args.smoke or args.no_results):
        write_section(name, title, body)
