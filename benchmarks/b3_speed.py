"""B3: speed and memory of our featurization against a plain training step and the anchor libraries.

On one device, in one run, per model (digits MLP 64-128-10; Fashion-MNIST MLP 784-512-512-10 and
CNN conv32-pool-conv64-pool-fc128-fc10 on the 60,000 training images): throughput (examples/s)
of a plain batched forward+backward, of our TRAK featurization (Kronecker and dense projection),
EK-FAC factor fit and SOURCE passes, of traker and kronfluence doing the same jobs, the time to
score 1,000 queries, and the peak memory of each job; then whole jobs (fit on the whole training
set and score 1,000 queries: TRAK, projected EK-FAC, exact EK-FAC on a GPU). Models are randomly initialised (seeded):
throughput does not depend on the weights. Every job uses the same batch size. Then a scaling
series of Kronecker featurization in N, the LDS of Kronecker against dense projection at
equal k on B1's digits run, and TRAK's LDS by Kronecker block size on the demo runs (what the
default block trades). --smoke: 256 training images per model, narrow models (common.smoke_model), k = 64, 32 queries, B1's smoke run.

    python benchmarks/b3_speed.py [--quick | --smoke] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from b1_digits_lds import the_run
from common import (
    anchors_available,
    by_mode,
    fashion_mnist,
    markdown_table,
    parser,
    report,
    sized_model,
    timed,
    workspace_root,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from attribution_core.api import attribute, resolve_device
from attribution_core.data import Dataset, DataSpec, load_dataset
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.methods.influence import Influence, InfluenceSettings
from attribution_core.methods.source import Source, SourceSettings
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.models import ModelSpec, build_model
from attribution_core.numerics.curvature import eigenbasis, fit_corrected_eigenvalues, fit_covariances
from attribution_core.numerics.inputs import AttributionInputs, Segment
from attribution_core.runs.demo import build_demo
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace

BATCH = 512
JSON_KEYS = ("device", "rows", "lds_kron_vs_dense", "lds_by_block", "scaling", "whole_jobs")


@dataclass(frozen=True)
class Scale:
    """How much of each job a run times."""

    k: int  # projection dimension of every featurization
    max_train: int | None  # training images of each data set (None: all; Fashion-MNIST's 60,000)
    slow_examples: int  # examples given to the slow dense projections (ours and traker's CPU projector)
    kronfluence_examples: int  # examples given to kronfluence's factor fit
    curvature_examples: int | None  # examples given to our EK-FAC fit and SOURCE passes (None: all)
    scaling: tuple[int, ...]  # N of the scaling series
    lds_subsets: int  # retrained subsets of the LDS ground truth
    lds_k: int  # projection dimension of the Kronecker against dense LDS comparison
    repeats: int  # best-of repetitions of the fast jobs
    n_queries: int = 1000  # queries scored against the whole training set
    block_runs: tuple[str, ...] = ("fmnist-mlp", "fmnist-noisy", "fmnist-two-stage")  # demo runs of the LDS by block size
    blocks: tuple[int, ...] = (1, 4, 9, 16, 0)  # Kronecker block sizes compared (0: one block per layer)
    block_seeds: int = 3  # projection seeds averaged per block size


FULL = Scale(k=2048, max_train=None, slow_examples=512, kronfluence_examples=10_000, curvature_examples=10_000,
             scaling=(5_000, 10_000, 20_000, 60_000), lds_subsets=100, lds_k=1024, repeats=5)
QUICK = Scale(k=512, max_train=2_000, slow_examples=256, kronfluence_examples=1_000, curvature_examples=1_000,
              scaling=(1_000, 2_000, 4_000), lds_subsets=20, lds_k=1024, repeats=1)
SMOKE = Scale(k=64, max_train=256, slow_examples=64, kronfluence_examples=128, curvature_examples=128,
              scaling=(128, 256), lds_subsets=4, lds_k=256, repeats=1, n_queries=32,
              block_runs=("fmnist-mlp",), blocks=(4, 9), block_seeds=1)
SCORING = "score_queries"
"""The job timed per query rather than per training example."""


@dataclass
class Row:
    """One timed job."""

    model: str
    job: str
    library: str
    n_examples: int
    seconds: float
    peak_mb: float
    subsampled: bool
    ratio_to_train_step: float | None = None

    @property
    def examples_per_s(self) -> float:
        """Examples (queries for scoring, examples × checkpoints for SOURCE) per second."""
        return self.n_examples / self.seconds

    def as_json(self) -> dict:
        """The JSON row of the --json output."""
        return {"model": self.model, "job": self.job, "library": self.library, "examples_per_s": self.examples_per_s,
                "ratio_to_train_step": self.ratio_to_train_step, "peak_mb": self.peak_mb,
                "n_examples": self.n_examples, "seconds": self.seconds}


class PeakMemory:
    """Peak memory inside a block: torch.cuda.max_memory_allocated on a GPU, else the process RSS (sampled)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:  # RSS at least every 20 ms, and once more at the end
            self.peak_mb = max(self.peak_mb, rss_mb())
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def rss_mb() -> float:
    """The process's resident memory now, in MB (Linux's /proc; psutil is not a dependency)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(job: Callable[[], object], device: torch.device, repeats: int = 1) -> tuple[float, float]:
    """(best seconds, peak MB) of job() over the repetitions."""
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        with PeakMemory(device) as memory, timed() as clock:
            job()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        best, peak = min(best, clock.seconds), max(peak, memory.peak_mb)
    return best, peak


def seeded(build: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """A randomly initialised model, fixed by the seed, in eval mode on the device."""
    torch.manual_seed(seed)
    return build().to(device).eval()


def inputs_for(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, device: torch.device) -> AttributionInputs:
    """AttributionInputs over the given checkpoints at the benchmark's batch size."""
    return AttributionInputs(models, [0.1] * len(models), x, y, device=device, batch_size=BATCH)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """One pass of plain batched forward + backward of the mean cross-entropy."""
    for start in range(0, len(y), BATCH):
        loss = F.cross_entropy(model(x[start : start + BATCH].to(device)), y[start : start + BATCH].to(device))
        loss.backward()
        model.zero_grad(set_to_none=True)


def trak_features(inputs: AttributionInputs, k: int, projection: str) -> torch.Tensor:
    """Our TRAK train features Φ (N, k) at the first checkpoint."""
    method = Trak(TrakSettings(k=k, projection=projection))
    return method.train_features(inputs.models[0], inputs, method.projector(inputs))


def ekfac_fit(inputs: AttributionInputs) -> None:
    """Our EK-FAC factors at the first checkpoint: covariances, eigenbases, corrected eigenvalues."""
    model = inputs.models[0]
    bases = eigenbasis(fit_covariances([model], inputs))
    fit_corrected_eigenvalues(model, bases, inputs)


def source_fit(inputs: AttributionInputs) -> None:
    """SOURCE's passes for one segment over all of the inputs' checkpoints."""
    Source(SourceSettings(n_segments=1)).fit(replace(inputs, segments=[Segment(inputs.models, lr_sum=1.0)]))


def score_queries(inputs: AttributionInputs, k: int, query_x: torch.Tensor, query_y: torch.Tensor) -> None:
    """TRAK scores of the queries against preconditioned features of the whole training set (values do not matter)."""
    state = {"preconditioned_0": torch.randn(len(inputs.train_y), k)}
    Trak(TrakSettings(k=k)).score(state, inputs, query_x, query_y)


def traker_featurize(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, device: torch.device) -> None:
    """traker's featurization of (x, y) at one checkpoint (its CPU projector on a CPU)."""
    from trak import TRAKer

    with tempfile.TemporaryDirectory(prefix="traker-") as directory:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=directory,
                        device=str(device), proj_dim=k, use_half_precision=False, logging_level=logging.ERROR)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for start in range(0, len(y), BATCH):
            batch = [x[start : start + BATCH].to(device), y[start : start + BATCH].to(device)]
            traker.featurize(batch=batch, num_samples=len(batch[1]))


def kronfluence_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """kronfluence's EK-FAC factors (covariances, eigendecomposition, corrected eigenvalues) on (x, y)."""
    from anchors import _kronfluence_task
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    task = _kronfluence_task()
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as directory:
        analyzer = Analyzer(analysis_name="b3", model=prepare_model(copy.deepcopy(model), task), task=task,
                            cpu=device.type == "cpu", disable_tqdm=True, output_dir=directory)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=TensorDataset(x, y), per_device_batch_size=BATCH,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)


@dataclass
class Setting:
    """A model and its data: the model's spec, the training set and the queries."""

    name: str
    model: ModelSpec
    train: Dataset
    test: Dataset

    def build(self) -> nn.Module:
        """A freshly initialised model (initialisation follows torch's global RNG)."""
        return build_model(self.model, self.train.input_shape, self.train.n_classes)


def settings(scale: Scale, args: argparse.Namespace) -> tuple[list[Setting], str]:
    """The benchmark's models and data, and a note saying which Fashion-MNIST data was used."""
    digits_train, digits_test = load_dataset(DataSpec(source="digits", test_size=360, split_seed=0, max_train=scale.max_train))
    fashion, source = fashion_mnist(scale.max_train, args)
    fashion_train, fashion_test = load_dataset(fashion)
    note = f"{source}, {len(fashion_train)} training images."
    # a smoke run narrows the models too: the full CNN's eigendecompositions alone take seconds
    return [
        Setting("digits mlp", sized_model(args, ModelSpec("mlp", {"hidden": [128]})), digits_train, digits_test),
        Setting("fmnist mlp", sized_model(args, ModelSpec("mlp", {"hidden": [512, 512]})), fashion_train, fashion_test),
        Setting("fmnist cnn", sized_model(args, ModelSpec("cnn", {"channels": [32, 64], "hidden": 128})), fashion_train, fashion_test),
    ], note


def model_rows(setting: Setting, scale: Scale, device: torch.device, anchors: bool) -> list[Row]:
    """Every job's row for one model; ratios to the plain training step filled in."""
    model, second = seeded(setting.build, 0, device), seeded(setting.build, 1, device)
    x, y = setting.train.x, setting.train.y
    n, n_slow, n_kf = len(y), min(scale.slow_examples, len(y)), min(scale.kronfluence_examples, len(y))
    n_curv = min(scale.curvature_examples or n, n)
    curvature = inputs_for([model], x[:n_curv], y[:n_curv], device)
    queries = torch.arange(scale.n_queries) % len(setting.test)  # repeats the test set where it holds fewer
    inputs, slow = inputs_for([model], x, y, device), inputs_for([model], x[:n_slow], y[:n_slow], device)
    jobs: list[tuple[str, str, int, Callable[[], object], int]] = [
        ("train_step", "torch", n, lambda: train_steps(model, x, y, device), scale.repeats),
        ("trak_featurize_kron", "tda-explorer", n, lambda: trak_features(inputs, scale.k, "kronecker"), scale.repeats),
        ("trak_featurize_dense", "tda-explorer", n_slow, lambda: trak_features(slow, scale.k, "dense"), 1),
        ("ekfac_fit", "tda-explorer", n_curv, lambda: ekfac_fit(curvature), 1),
        ("source_passes", "tda-explorer", 2 * n_curv,
         lambda: source_fit(replace(curvature, models=[model, second], checkpoint_lrs=[0.1, 0.1])), 1),
        (SCORING, "tda-explorer", scale.n_queries,
         lambda: score_queries(inputs, scale.k, setting.test.x[queries], setting.test.y[queries]), 1),
    ]
    if anchors:
        jobs += [
            ("trak_featurize", "traker", n_slow, lambda: traker_featurize(model, x[:n_slow], y[:n_slow], scale.k, device), 1),
            ("ekfac_fit", "kronfluence", n_kf, lambda: kronfluence_fit(model, x[:n_kf], y[:n_kf], device), 1),
        ]
    rows = []
    for job, library, count, function, repeats in jobs:
        seconds, peak = measure(function, device, repeats)
        subsampled = count < (2 * n if job == "source_passes" else n) and job != SCORING
        rows.append(Row(setting.name, job, library, count, seconds, peak, subsampled))
        print(f"{setting.name:12s} {job:22s} {library:13s} {count:7d} ex {seconds:8.2f} s {peak:8.0f} MB", flush=True)
    train_rate = rows[0].examples_per_s
    for row in rows:
        if row.job != SCORING:  # queries/s is not comparable with a training step
            row.ratio_to_train_step = row.examples_per_s / train_rate
    return rows


def whole_jobs(setting: Setting, scale: Scale, device: torch.device) -> list[tuple]:
    """(model, job, N, seconds, peak MB) of whole jobs: fit on every training example, then score the queries.

    TRAK and projected EK-FAC everywhere; exact EK-FAC (a pass over the training set per block
    of queries, tens of minutes on a CPU) only on a GPU.
    """
    model = seeded(setting.build, 0, device)
    inputs = inputs_for([model], setting.train.x, setting.train.y, device)
    queries = torch.arange(scale.n_queries) % len(setting.test)
    query_x, query_y = setting.test.x[queries], setting.test.y[queries]
    methods = [("trak_job", Trak(TrakSettings(k=scale.k))), ("ekfac_projected_job", Influence(InfluenceSettings(k=scale.k)))]
    if device.type == "cuda":
        methods.append(("ekfac_exact_job", Influence()))
    rows = []
    for job, method in methods:
        seconds, peak = measure(lambda method=method: method.score(method.fit(inputs), inputs, query_x, query_y), device)
        rows.append((setting.name, job, len(setting.train), seconds, peak))
        print(f"{setting.name:12s} {job:22s} {len(setting.train):7d} ex {seconds:8.2f} s {peak:8.0f} MB", flush=True)
    return rows


def scaling_series(setting: Setting, scale: Scale, device: torch.device) -> list[tuple[int, float, float, float, float]]:
    """(N, seconds, µs per example, peak MB, N·k in MB) of Kronecker featurization for growing N (data repeated past its size)."""
    model = seeded(setting.build, 0, device)
    series = []
    for n in scale.scaling:
        index = torch.arange(n) % len(setting.train)
        inputs = inputs_for([model], setting.train.x[index], setting.train.y[index], device)
        seconds, peak = measure(lambda inputs=inputs: trak_features(inputs, scale.k, "kronecker"), device)
        series.append((n, seconds, 1e6 * seconds / n, peak, n * scale.k * 4 / 2**20))
        del inputs
    return series


def lds_kron_vs_dense(scale: Scale, workspace: Workspace, args: argparse.Namespace) -> dict[str, float]:
    """LDS of TRAK with Kronecker and with dense projection at equal k on B1's digits run."""
    run = the_run(workspace, args)
    truth = groundtruth(run, LdsSettings(n_subsets=scale.lds_subsets, alpha=0.5, seed=0))
    result: dict[str, float] = {"k": scale.lds_k}
    for name, projection in (("kron", "kronecker"), ("dense", "dense")):
        scores = attribute(run, "trak", settings={"k": scale.lds_k, "projection": projection}, device="cpu")
        result[name] = lds(scores, truth).mean
    return result


def lds_by_block(scale: Scale, workspace: Workspace, args: argparse.Namespace) -> list[dict]:
    """TRAK's LDS at k = lds_k per Kronecker block size on demo runs, mean and spread over projection seeds."""
    build_demo(workspace, tiny=args.smoke)
    rows = []
    for run_id in scale.block_runs:
        run = load_run(workspace, run_id)
        truth = groundtruth(run, LdsSettings(n_subsets=scale.lds_subsets, alpha=0.5, seed=0))
        for block in scale.blocks:
            values = [lds(attribute(run, "trak", settings=TrakSettings(k=scale.lds_k, kronecker_block=block, seed=seed), device="cpu"),
                          truth).mean for seed in range(scale.block_seeds)]
            rows.append({"run": run_id, "block": block, "lds": float(np.mean(values)), "spread": float(np.std(values))})
    return rows


def block_table(rows: list[dict]) -> str:
    """TRAK's LDS per run and block size."""
    return markdown_table(["run", "block", "LDS (mean over seeds)", "spread (std)"],
                          [(row["run"], row["block"] or "0 (one per layer)", row["lds"], row["spread"]) for row in rows])


def main_table(rows: list[Row]) -> str:
    """Every job's throughput, ratio to the training step and peak memory."""
    def examples(row: Row) -> str:
        return f"{row.n_examples}" + (" (sub-sample)" if row.subsampled else "")

    return markdown_table(
        ["model", "job", "library", "examples", "seconds", "examples/s", "÷ train step", "peak MB"],
        [(row.model, row.job, row.library, examples(row), row.seconds, f"{row.examples_per_s:,.0f}",
          "" if row.ratio_to_train_step is None else row.ratio_to_train_step, f"{row.peak_mb:,.0f}") for row in rows],
    )


def anchor_table(rows: list[Row]) -> str:
    """Ours against the anchor doing the same job, with the bars of benchmarks.md."""
    pairs = (("trak_featurize_kron", "trak_featurize", "traker", "≥ 10×"), ("ekfac_fit", "ekfac_fit", "kronfluence", "≥ 5×"))
    by_key = {(row.model, row.job, row.library): row for row in rows}
    lines = []
    for model in dict.fromkeys(row.model for row in rows):
        for ours_job, anchor_job, anchor, bar in pairs:
            ours, theirs = by_key.get((model, ours_job, "tda-explorer")), by_key.get((model, anchor_job, anchor))
            if ours and theirs:
                lines.append((model, f"{ours_job} vs {anchor}", f"{ours.examples_per_s:,.0f}", f"{theirs.examples_per_s:,.0f}",
                              ours.examples_per_s / theirs.examples_per_s, bar))
    return markdown_table(["model", "job", "ours examples/s", "anchor examples/s", "ours ÷ anchor", "bar"], lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    scale, device = by_mode(args, full=FULL, quick=QUICK, smoke=SMOKE), resolve_device("auto")
    anchors = anchors_available()
    models, data_note = settings(scale, args)
    rows = [row for setting in models for row in model_rows(setting, scale, device, anchors)]
    jobs = [row for setting in models[1:] for row in whole_jobs(setting, scale, device)]
    series = scaling_series(models[1], scale, device)
    n_params = sum(parameter.numel() for parameter in models[1].build().parameters())
    with workspace_root(args.workspace) as root:
        quality = lds_kron_vs_dense(scale, Workspace(root), args)
        by_block = lds_by_block(scale, Workspace(root), args)
    body = (
        f"Device: {device}. {data_note} Randomly initialised models; batch {BATCH} for every job; k = {scale.k}. "
        f"Dense projections (ours, traker's CPU projector) are timed on the first {scale.slow_examples} examples, "
        f"kronfluence's factor fit on the first {scale.kronfluence_examples}, ours on the first "
        f"{scale.curvature_examples or 'all'} (both fits include the eigendecompositions, a cost that does not grow with N): "
        "the per-example work is linear in N. SOURCE: one segment of "
        "two checkpoints (a covariance and an eigenvalue pass per checkpoint), counted as examples × checkpoints. "
        f"Scoring: projected gradients of {scale.n_queries:,} test queries times the precomputed (N, k) features. Peak memory: "
        "the process RSS (CPU) or torch.cuda.max_memory_allocated (GPU) during the job. Fast jobs: best of "
        f"{scale.repeats}.\n\n" + main_table(rows) + "\n\nOurs against the anchors (same job, same batch size and k):\n\n"
        + anchor_table(rows)
        + f"\n\nWhole jobs: fit on all {len(models[1].train)} training images, then score {scale.n_queries:,} queries against them "
        f"(k = {scale.k}; projected EK-FAC: `InfluenceSettings(k=k)`; exact EK-FAC only on a GPU). "
        "The H100 bars of benchmarks.md: TRAK under 0.5 s, EK-FAC under 1 s.\n\n"
        + markdown_table(["model", "job", "training examples", "seconds", "peak MB"], [(*row[:4], f"{row[4]:,.0f}") for row in jobs])
        + f"\n\nScaling of Kronecker TRAK featurization, {models[1].name}:\n\n"
        + markdown_table(["N", "seconds", "µs / example", "peak MB (process)", "features N·k·4 bytes, MB"], series)
        + "\n\nThe process's peak includes the data set itself (N × 784 floats, repeated) and the interpreter; "
        f"per-example gradients (N × {n_params:,} floats: {n_params * 4000 / 2**30:.1f} GB at N = 1,000) are never formed."
        + f"\n\nLDS on B1's digits run ({scale.lds_subsets} subsets), TRAK at k = {quality['k']}: "
        f"Kronecker {quality['kron']:.3f}, dense {quality['dense']:.3f} (difference {quality['kron'] - quality['dense']:+.3f}; "
        "bar: within 0.01)."
        + f"\n\nTRAK's LDS by Kronecker block size (k = {scale.lds_k}, {scale.lds_subsets} subsets, {scale.block_seeds} projection seeds; "
        f"default block {TrakSettings().kronecker_block}). A block of b = k_out x k_in features shares its factors: the projection "
        "costs about k_l (d_out / k_in + d_in / k_out) per position, so 1 / sqrt(b) of block 1's for a square block, and a dot "
        "product's variance grows like k_out + k_in:\n\n" + block_table(by_block)
    )
    payload = {"device": str(device), "rows": [row.as_json() for row in rows], "lds_kron_vs_dense": quality, "lds_by_block": by_block,
               "scaling": [{"n": n, "seconds": seconds, "peak_mb": peak} for n, seconds, _, peak, _ in series],
               "whole_jobs": [{"model": model, "job": job, "n_train": n, "n_queries": scale.n_queries, "seconds": seconds, "peak_mb": peak}
                              for model, job, n, seconds, peak in jobs]}
    report("b3", "B3 · Speed and memory", body, args, payload)


if __name__ == "__main__":
    main()
