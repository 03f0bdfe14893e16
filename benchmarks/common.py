"""Shared benchmark helpers: the common command line, timing, markdown tables and RESULTS.md sections.

Every benchmark prints its table and replaces its own section of benchmarks/RESULTS.md, headed
by the date, the machine, the library versions and the exact command that produced it.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from attribution_core.store import atomic_write_bytes, file_lock

RESULTS = Path(__file__).with_name("RESULTS.md")
ANCHORS = {"traker": "trak", "kronfluence": "kronfluence"}
"""The anchor libraries: package name (what pip installs) -> module name (what Python imports)."""
ANCHORS_MISSING = "traker/kronfluence not installed: pip install -e .[bench]"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: --quick, --json, --workspace."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="a smaller, faster version for CI")
    result.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON to this path")
    result.add_argument("--workspace", type=Path, default=None,
                        help="workspace directory (default: a fresh temporary one; an existing one reuses stored results)")
    result.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    return result


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


def anchors_installed() -> bool:
    """Whether both anchor libraries can be imported (checked without importing them)."""
    return all(importlib.util.find_spec(module) is not None for module in ANCHORS.values())


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
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder; each replaces its own section.\n"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        atomic_write_bytes(RESULTS, text.encode())


def report(name: str, title: str, body: str, args: argparse.Namespace, payload: dict) -> None:
    """Print the table, write the JSON if asked, and update RESULTS.md (full runs only, unless told not to)."""
    print(body)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True))
    if not (args.quick or args.no_results):
        write_section(name, title, body)
