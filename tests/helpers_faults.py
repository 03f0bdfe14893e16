"""Fault injection: start a real `tdx` job, SIGKILL it at a random moment, check the workspace (a plain module).

tests/test_faults.py kills each kind of job once; benchmarks/b6_faults.py runs 100 trials with it.
A trial copies a prepared workspace, starts the job in a subprocess, kills it after a random delay
within the job's measured uninterrupted duration, then checks that
- every artifact (a folder with manifest.json) verifies against its recorded sizes and checksums,
  and every run.json's checkpoints verify (anything else is a resumable partial);
- annotations.sqlite passes `PRAGMA integrity_check` and holds every flag whose write returned;
- rerunning the job finishes and gives results identical to an uninterrupted run (bytes; jobs run on
  one thread, see REPRODUCIBLE).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attribution_core.annotations import Annotations
from attribution_core.runs.demo import build_demo
from attribution_core.runs.run import list_runs
from attribution_core.store import MANIFEST, Artifact, Workspace

RUN = "fmnist-mlp"
FLAG_WRITER = """
import sys
from attribution_core.annotations import Annotations
annotations = Annotations(sys.argv[1])
for example_id in range(int(sys.argv[2])):
    annotations.set_flag("fmnist-noisy", example_id, ("mislabeled", "ambiguous", "outlier", "fine")[example_id % 4], note=f"n{example_id}")
    print(example_id, flush=True)
"""


@dataclass(frozen=True)
class Job:
    """A job to interrupt: its command line in a workspace, and what its finished result is."""

    name: str
    needs_demo: bool
    command: Callable[[Path], list[str]]


def _tdx(*arguments: str) -> Callable[[Path], list[str]]:
    return lambda workspace: [sys.executable, "-m", "attribution_core.cli", *arguments, "--workspace", str(workspace)]


JOBS = [
    Job("demo", False, _tdx("demo", "--tiny")),
    Job("attribute", True, _tdx("attribute", RUN, "--method", "trak", "--set", "k=256")),
    Job("groundtruth", True, _tdx("lds", RUN, "--subsets", "8", "--methods", "graddot")),
    Job("counterfactual", True, _tdx("counterfactual", RUN, "0", "--k", "0.05", "--random", "2")),
    Job("flags", True, lambda workspace: [sys.executable, "-c", FLAG_WRITER, str(workspace / "annotations.sqlite"), "300"]),
]


def result_digest(workspace: Path) -> str:
    """A digest of every finished result in the workspace: checkpoints, artifact files and flags."""
    digest = hashlib.sha256()
    for run in list_runs(Workspace(workspace)):
        digest.update(json.dumps([(info.file, info.sha256) for info in run.checkpoints]).encode())
    # An artifact's folder is keyed by its run's creation time too (a retrained run gets new keys): compare runs/<id>/<kind> and the bytes.
    artifacts = sorted(json.dumps([str(manifest.parent.parent.relative_to(workspace)),
                                   sorted((n, f["sha256"]) for n, f in json.loads(manifest.read_text())["files"].items())])
                       for manifest in workspace.glob(f"runs/*/*/*/{MANIFEST}"))
    digest.update(json.dumps(artifacts).encode())
    if (workspace / "annotations.sqlite").exists():
        flags = Annotations(workspace / "annotations.sqlite").flags("fmnist-noisy")
        digest.update(json.dumps([(flag.example_id, flag.kind, flag.note) for flag in flags.values()]).encode())
    return digest.hexdigest()


def corrupt_items(workspace: Path) -> list[str]:
    """Artifacts or runs whose stored bytes do not match what was recorded when they were written."""
    problems = []
    for manifest in workspace.glob(f"runs/*/*/*/{MANIFEST}"):
        if not Artifact(manifest.parent).verify():
            problems.append(str(manifest.parent))
    for run in list_runs(Workspace(workspace)):
        problems += run.verify()
    database = workspace / "annotations.sqlite"
    if database.exists() and not Annotations(database).integrity_ok():
        problems.append(str(database))
    return problems


REPRODUCIBLE = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""The jobs' environment: one CPU thread. With two, PyTorch's CPU kernels may split a sum differently from one process to
the next on a busy machine, so two uninterrupted runs of the same job can already differ in their last bits (measured: the
first checkpoint's gradients of a TRAK fit differed in 3 of 16 processes beside a busy loop, in none of 16 with one
thread). With one thread a run is bit-reproducible, so a result that differs after a kill is the resume's fault."""


def run_to_completion(job: Job, workspace: Path) -> None:
    """Run the job without interruption (raises if it fails)."""
    subprocess.run(job.command(workspace), check=True, capture_output=True, text=True, timeout=600, env=REPRODUCIBLE)


def interrupted_run(job: Job, workspace: Path, delay: float) -> list[int]:
    """Start the job, SIGKILL it after `delay` seconds; returns the flag ids whose write returned."""
    process = subprocess.Popen(job.command(workspace), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=REPRODUCIBLE)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
    return [int(line) for line in output.split()] if job.name == "flags" else []


@dataclass
class Trial:
    """What one interrupted job left behind, and whether rerunning it gave the reference result."""

    job: str
    delay: float
    corrupt: int
    lost_flags: int
    resumed_identical: bool


class FaultInjector:
    """Prepares base workspaces and reference results once, then runs trials on copies."""

    def __init__(self, root: Path):
        self.root = root
        self.demo_base = root / "demo-base"
        self.reference: dict[str, tuple[str, float]] = {}

    def fresh_workspace(self, job: Job, name: str) -> Path:
        """An empty workspace, or a copy of the tiny demo (built on first use) for a job that needs it."""
        target = self.root / name
        shutil.rmtree(target, ignore_errors=True)
        if job.needs_demo:
            if not self.demo_base.exists():
                build_demo(Workspace(self.demo_base), tiny=True)
            shutil.copytree(self.demo_base, target)
        else:
            target.mkdir()
        return target

    def reference_result(self, job: Job) -> tuple[str, float]:
        """(digest of the uninterrupted result, seconds it took), computed once per job."""
        if job.name not in self.reference:
            workspace = self.fresh_workspace(job, f"reference-{job.name}")
            started = time.perf_counter()
            run_to_completion(job, workspace)
            self.reference[job.name] = (result_digest(workspace), time.perf_counter() - started)
        return self.reference[job.name]

    def trial(self, job: Job, rng: random.Random) -> Trial:
        """Kill the job once at a random moment, check the workspace, rerun it and compare with the reference."""
        digest, seconds = self.reference_result(job)
        workspace = self.fresh_workspace(job, "trial")
        delay = rng.uniform(0.05, seconds)
        acknowledged = interrupted_run(job, workspace, delay)
        corrupt = len(corrupt_items(workspace))
        stored = Annotations(workspace / "annotations.sqlite").flags("fmnist-noisy") if job.name == "flags" else {}
        lost = sum(1 for example_id in acknowledged if example_id not in stored)
        run_to_completion(job, workspace)
        return Trial(job.name, delay, corrupt, lost, result_digest(workspace) == digest)


def run_trials(n_trials: int, seed: int = 0, jobs: list[Job] = JOBS) -> list[Trial]:
    """n_trials interrupted jobs, spread evenly over the jobs."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tdx-faults-") as directory:
        injector = FaultInjector(Path(directory))
        trials = []
        for index in range(n_trials):
            trials.append(injector.trial(jobs[index % len(jobs)], rng))
            print(f"trial {index + 1}/{n_trials}: {trials[-1]}", flush=True)
        return trials


def summary(trials: list[Trial]) -> dict:
    """The JSON payload: totals and a breakdown by job."""
    def totals(selected: list[Trial]) -> dict:
        return {"trials": len(selected), "corrupt": sum(t.corrupt for t in selected),
                "lost_flags": sum(t.lost_flags for t in selected), "resumed_identical": sum(t.resumed_identical for t in selected)}

    by_job = {name: totals([t for t in trials if t.job == name]) for name in dict.fromkeys(t.job for t in trials)}
    return totals(trials) | {"by_job": by_job}
