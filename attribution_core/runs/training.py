"""Training that records its trajectory: `train`, `fit_model` and `retrain` of a Recipe (run.py).

A Recipe is a list of Stages (pretrain, then fine-tune, ...), each with its own optimizer,
schedule and data selection. Training records, for every optimizer step, its stage, learning
rate, momentum and batch size, and which checkpoint follows which step: SOURCE reads eta*K of a
segment straight from this record. `retrain(run, keep_mask)` re-runs every stage without the
masked-out examples; LDS ground truth and counterfactual checks rest on it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import Dataset, DataSpec, load_dataset
from ..errors import SettingsError
from ..models import ModelSpec, build_model
from ..progress import ProgressFn, no_progress
from ..store import Workspace, atomic_write_json, file_sha256, save_tensors
from .record import RECORD_DIR, RecordWriter, TrainingRecord, optimizer_hyperparameters
from .run import CheckpointInfo, Recipe, Run, Stage, Trajectory


def learning_rate(stage: Stage, step_in_stage: int, steps_per_epoch: int) -> float:
    """The stage's learning rate at its step_in_stage-th step (0-based)."""
    total = stage.epochs * steps_per_epoch
    if stage.schedule == "step":
        factor = stage.step_gamma ** (step_in_stage // (stage.step_epochs * steps_per_epoch))
    elif stage.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * step_in_stage / total))
    elif stage.schedule == "linear":
        factor = 1 - step_in_stage / total
    else:
        factor = 1.0
    if step_in_stage < stage.warmup_steps:
        factor *= (step_in_stage + 1) / stage.warmup_steps
    return stage.lr * factor


def _make_optimizer(stage: Stage, model: nn.Module) -> torch.optim.Optimizer:
    if stage.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=stage.lr, betas=(stage.momentum, 0.999), weight_decay=stage.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)


def stage_indices(stage: Stage, labels: torch.Tensor, keep_mask: np.ndarray | None) -> torch.Tensor:
    """Training-set indices a stage trains on: its classes, minus masked-out examples."""
    selected = stage.members(labels.numpy())
    if keep_mask is not None:
        selected &= np.asarray(keep_mask, dtype=bool)
    return torch.from_numpy(np.flatnonzero(selected))


def _checkpoint_steps(recipe: Recipe, steps_per_epoch: list[int]) -> set[int]:
    """Global step numbers after which a checkpoint is saved."""
    stage_ends = np.cumsum([stage.epochs * spe for stage, spe in zip(recipe.stages, steps_per_epoch)])
    total = int(stage_ends[-1])
    steps = set(int(end) for end in stage_ends)
    if recipe.checkpoints.count is not None:
        steps |= {max(1, round(total * (i + 1) / recipe.checkpoints.count)) for i in range(recipe.checkpoints.count)}
    else:
        start = 0
        for spe, end in zip(steps_per_epoch, stage_ends):
            interval = recipe.checkpoints.every_epochs * spe
            steps |= set(range(start + interval, int(end) + 1, interval))
            start = int(end)
    return steps


SMALL_MODEL_PARAMETERS = 1_000_000
"""Below this size a training step is too small to share between threads: one thread is faster
(several times so on a busy machine), and pinning it makes weights independent of the caller's
thread settings."""


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch on one CPU thread inside the block (when enabled), restoring the caller's setting afterwards.

    Float sums then do not depend on the thread count, and the small models that training and
    evaluation run many times train as fast or faster: on 2 cores an idle machine gains nothing
    from a second thread, and a busy one made threaded retraining 10-100x slower in our measurements.
    """
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_small(model: nn.Module) -> bool:
    """Whether a model trains faster on one thread (see SMALL_MODEL_PARAMETERS)."""
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


@dataclass
class TrainingResult:
    """A trained model with its trajectory and the states at the checkpoint steps."""

    model: nn.Module
    trajectory: Trajectory
    checkpoints: list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]


def fit_model(
    train_set: Dataset,
    model_spec: ModelSpec,
    recipe: Recipe,
    *,
    keep_mask: np.ndarray | None = None,
    seed: int | None = None,
    keep_checkpoints: bool = True,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    record: RecordWriter | None = None,
) -> TrainingResult:
    """Train a fresh model through every stage of the recipe; same inputs give identical weights.

    With a record writer, every step's hyperparameters, batch rows and per-example losses are
    appended to it (flushed at every checkpoint and at the end; margins follow from the losses).
    """
    seed = recipe.seed if seed is None else seed
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_spec, train_set.input_shape, train_set.n_classes).to(device)
    per_stage = [stage_indices(stage, train_set.y, keep_mask) for stage in recipe.stages]
    for stage, indices in zip(recipe.stages, per_stage):
        if len(indices) == 0:
            raise SettingsError(
                f"stage {stage.name!r} has no training examples left (classes={stage.classes}); "
                "choose classes the training data holds"
            )
    steps_per_epoch = [math.ceil(len(indices) / stage.batch_size) for stage, indices in zip(recipe.stages, per_stage)]
    save_steps = _checkpoint_steps(recipe, steps_per_epoch)
    total_steps = sum(stage.epochs * spe for stage, spe in zip(recipe.stages, steps_per_epoch))
    trajectory, checkpoints = Trajectory(), []
    order_generator = torch.Generator().manual_seed(seed)
    with one_thread(is_small(model)):
        for stage_index, (stage, indices, spe) in enumerate(zip(recipe.stages, per_stage, steps_per_epoch)):
            stage_x = stage.view(train_set.x, seed + stage_index)[indices].to(device)
            stage_y = train_set.y[indices].to(device)
            optimizer = _make_optimizer(stage, model)
            model.train()
            for epoch in range(stage.epochs):
                permutation = torch.randperm(len(indices), generator=order_generator)
                for batch_number in range(spe):
                    batch = permutation[batch_number * stage.batch_size : (batch_number + 1) * stage.batch_size]
                    lr = learning_rate(stage, epoch * spe + batch_number, spe)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if on_batch is not None:
                        on_batch(stage_index, indices[batch])
                    optimizer.zero_grad(set_to_none=True)
                    logits, labels = model(stage_x[batch.to(device)]), stage_y[batch.to(device)]
                    losses = F.cross_entropy(logits, labels, reduction="none")
                    losses.mean().backward()  # the same gradient as the mean-reduced loss, bit for bit
                    optimizer.step()
                    trajectory.record(stage_index, stage, optimizer.param_groups[0]["lr"], len(batch))
                    step = trajectory.n_steps
                    if record is not None:
                        record.append(stage=stage_index, indices=indices[batch], losses=losses, **optimizer_hyperparameters(optimizer))
                    progress(step, total_steps)
                    if keep_checkpoints and step in save_steps:
                        info = CheckpointInfo(len(checkpoints), step, stage_index, epoch + 1, f"ckpt_{len(checkpoints):04d}.safetensors")
                        checkpoints.append((info, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
                        if record is not None:
                            record.flush()
                    model.train()
    model.eval()
    if record is not None:
        record.flush()
    return TrainingResult(model, trajectory, checkpoints)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a model on a dataset."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for start in range(0, len(dataset), batch_size):
        logits = model(dataset.x[start : start + batch_size].to(device))
        labels = dataset.y[start : start + batch_size].to(device)
        correct += int((logits.argmax(1) == labels).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    return {"accuracy": correct / max(1, len(dataset)), "loss": loss / max(1, len(dataset))}


def train(
    data: DataSpec,
    model_spec: ModelSpec,
    recipe: Recipe,
    workspace: Workspace | str | Path,
    run_id: str,
    *,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> Run:
    """Train a run and save it (checkpoints as safetensors, then run.json last)."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    directory = workspace.run_dir(run_id, must_exist=False)
    train_set, test_set = load_dataset(data)
    started = time.perf_counter()
    record = RecordWriter(directory / RECORD_DIR, margins_from_losses=True)  # the trainer's loss is cross-entropy
    result = fit_model(train_set, model_spec, recipe, device=device, progress=progress, record=record)
    seconds = time.perf_counter() - started
    infos = []
    for info, state in result.checkpoints:
        path = directory / "checkpoints" / info.file
        save_tensors(path, state, metadata={"step": str(info.step)})
        model = build_model(model_spec, train_set.input_shape, train_set.n_classes)
        model.load_state_dict(state)
        infos.append(CheckpointInfo(**{**asdict(info), "test_accuracy": evaluate(model, test_set)["accuracy"],
                                       "sha256": file_sha256(path), "size": path.stat().st_size}))
    train_metrics, test_metrics = evaluate(result.model, train_set), evaluate(result.model, test_set)
    metrics = {
        "train_accuracy": train_metrics["accuracy"],
        "train_loss": train_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "train_seconds": seconds,
        "n_train": len(train_set),
        "n_test": len(test_set),
        "n_parameters": sum(p.numel() for p in result.model.parameters()),
    }
    if train_set.original_y is not None:
        flipped = torch.as_tensor(train_set.flipped)
        predictions = result.model.cpu()(train_set.x[flipped]).argmax(1) if flipped.any() else torch.empty(0)
        metrics["flipped_fit_fraction"] = float((predictions == train_set.y[flipped]).float().mean()) if flipped.any() else 0.0
    run = Run(
        run_id, workspace, data, model_spec, recipe, result.trajectory, infos, metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), record=TrainingRecord.load(directory / RECORD_DIR),
    )
    atomic_write_json(directory / "run.json", run.to_json())
    return run


def why_not_retrainable(run: Run) -> str | None:
    """Why tdx cannot retrain this run (LDS ground truth, counterfactual checks, out-of-fold probabilities), or None when it can."""
    origin = run.metrics.get("origin", "trained")
    if origin == "trained":
        return None
    return (f"run {run.run_id!r} was {origin} outside tdx's trainer: its recipe only describes the training, so tdx cannot "
            "retrain it (LDS ground truth, counterfactual checks, out-of-fold mislabel probabilities)")


def retrain(
    run: Run,
    keep_mask: np.ndarray,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> nn.Module:
    """The run's whole pipeline (every stage) re-run on the kept examples; returns the final model."""
    reason = why_not_retrainable(run)
    if reason is not None:
        raise SettingsError(reason)
    train_set, _ = run.datasets()
    keep_mask = np.asarray(keep_mask, dtype=bool)
    if keep_mask.shape != (len(train_set),):
        raise SettingsError(f"keep_mask has shape {keep_mask.shape}, expected ({len(train_set)},) for run {run.run_id!r}")
    return fit_model(
        train_set, run.model, run.recipe, keep_mask=keep_mask, seed=seed, keep_checkpoints=False, device=device, progress=progress
    ).model
