"""Training through training functions: tdx's own recipe is one, a user's loop another, and every retrain calls the run's.

- `train_recipe(session)`: tdx's trainer as a training function: a Recipe's stages in order, each
  with its optimizer, schedule, classes and view (what `tdx train` and the demo run);
- `record_run(workspace, run_id, function, ...)`: any training function called once and recorded
  as a run that names it (a user's loop: `tdx record`); `train(...)` records train_recipe;
- `retrain(run, ...)`: the run's own training function called again, on fresh draws of the kept
  rows (reshuffled, a new seed allowed) or on the recorded batches with removed rows weighted 0
  (order-keeping), optionally relabelled. The LDS ground truth, the counterfactual and smoothness
  checks, out-of-fold probabilities and the cleaning experiment all retrain through it, so they
  train what the run's function trains, and minimise the task's train_loss where the function
  does (tdx's recipe does);
- `fit_model(...)`: train_recipe on a Dataset with no workspace (tests, benchmarks), checkpoints in memory.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset, DataSpec, load_dataset
from ..errors import SettingsError
from ..models import ModelSpec, build_model
from ..progress import ProgressFn, no_progress
from ..store import Workspace
from ..task import Task
from ..trust import trust
from .record import RecordWriter, optimizer_hyperparameters
from .recorder import ArrayData, Recorder, RecorderSettings
from .run import RECIPE_FUNCTION, CheckpointInfo, Recipe, Run, Stage, TrainedBy, Trajectory
from .session import Draws, TrainingFunction, TrainingSession, call_function, import_path


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


def train_recipe(session: TrainingSession) -> None:
    """tdx's own trainer: the session's recipe, stage by stage, each stage's view of the inputs, a fresh optimizer per stage."""
    recipe = session.recipe
    if recipe is None:
        raise SettingsError("train_recipe trains a Recipe: give the session tdx's recipe (session.recipe)")
    labels = session.train_set.y.numpy()
    members = [stage.members(labels) for stage in recipe.stages]
    per_epoch = [session.n_batches(stage.batch_size, rows=rows) for stage, rows in zip(recipe.stages, members)]
    for stage, count in zip(recipe.stages, per_epoch):
        if count == 0:
            raise SettingsError(f"stage {stage.name!r} has no training examples left (classes={stage.classes}); "
                                "choose classes the training data holds")
    session.total_steps = sum(stage.epochs * count for stage, count in zip(recipe.stages, per_epoch))
    save_steps, model = _checkpoint_steps(recipe, per_epoch), session.model
    for stage_index, (stage, rows) in enumerate(zip(recipe.stages, members)):
        session.stage(stage.name)
        view = stage.view(session.train_set.x, session.seed + stage_index)
        optimizer = _make_optimizer(stage, model)
        model.train()
        for epoch in range(stage.epochs):
            for batch in session.batches(stage.batch_size, rows=rows, inputs=None if view is session.train_set.x else view):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(stage, epoch * batch.of + batch.number, batch.of)
                optimizer.zero_grad(set_to_none=True)
                losses = session.task.train_loss(model, batch.x, batch.y)
                batch.loss(losses).backward()  # with every weight 1: the mean-reduced loss's gradient, bit for bit
                optimizer.step()
                if session.step(optimizer, batch, losses=losses) in save_steps:
                    session.checkpoint(epoch=epoch + 1)
                    model.train()  # the checkpoint's evaluation left it in eval mode


def initial_model(spec: ModelSpec, train_set: Dataset, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The spec's model for the data, initialised from the seed (the caller's RNG untouched): where every session starts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec, train_set.input_shape, train_set.n_classes)
    return model.to(device)


def load_function(path: str) -> TrainingFunction:
    """The training function at "package.module:function" (check consent first: trust.py), or a SettingsError saying why not."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise SettingsError(f"training function {path!r}: give it as 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"training function {path!r} does not import ({type(exc).__name__}: {exc}); it must be importable "
                            "where tdx runs (an installed package, or a module in the folder tdx is started from)") from exc
    if not callable(function):
        raise SettingsError(f"training function {path!r} is a {type(function).__name__}, not a function of the session")
    return function


def _json_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """A function's options, checked to be what run.json can keep (JSON values)."""
    options = dict(options or {})
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"training function options must be JSON values (numbers, strings, lists, dicts): {exc}") from exc


def record_run(
    workspace: Workspace | str | Path,
    run_id: str,
    function: TrainingFunction | str,
    *,
    data: DataSpec | ArrayData,
    model: ModelSpec | str,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    task: Task | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
    settings: RecorderSettings | None = None,
) -> Run:
    """Call a training function once (an importable function, or its "package.module:function" path) and record the run.

    The run names the function, its options and seed, so that tdx can call it again (retrain,
    replay). settings default: RecorderSettings(margins_from_losses=True), i.e. the losses the
    function passes to session.step are plain cross-entropy; pass RecorderSettings() otherwise.
    A function that raises leaves an incomplete run saying why (recorder.py), never a broken one.
    """
    path = function if isinstance(function, str) else import_path(function, "training function")
    function = load_function(path) if isinstance(function, str) else function
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    options = _json_options(options)
    trust([path.partition(":")[0]], workspace.root)  # the user runs this code now: opening the run later needs no consent
    train_set, _ = data.datasets() if isinstance(data, ArrayData) else load_dataset(data)
    recorder = Recorder(workspace, run_id, model=initial_model(spec, train_set, seed, device), factory=spec.name, options=spec.options,
                        data=data, seed=seed, settings=settings or RecorderSettings(margins_from_losses=True))
    session = TrainingSession(model=recorder.model, train_set=recorder.train_set, test_set=recorder.test_set, seed=seed, options=options,
                              task=task, recipe=recipe, sink=recorder, device=device, progress=progress)
    try:
        call_function(function, session)
        trained_by = TrainedBy(path, options, tuple(session.augment_log), tuple(session.optimizer_starts), tuple(session.not_replayable))
        return recorder.finish(recipe=recipe, trained_by=trained_by)
    except BaseException as exc:
        recorder.abort(f"{type(exc).__name__}: {exc}")
        raise


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
    """Train a run by tdx's recipe and save it (checkpoints as safetensors, run.json last); an existing run of the id is replaced."""
    return record_run(workspace, run_id, train_recipe, data=data, model=model_spec, seed=recipe.seed, recipe=recipe, device=device,
                      progress=progress, settings=RecorderSettings(margins_from_losses=True, overwrite=True))


def why_not_retrainable(run: Run) -> str | None:
    """Why tdx cannot train this run again (LDS ground truth, counterfactual checks, out-of-fold probabilities), or None when it can."""
    if run.training_function() is not None:
        return None
    return (f"run {run.run_id!r} was {run.origin} from a plain loop, which tdx cannot call again, so nothing that retrains "
            "applies to it (LDS ground truth, counterfactual and smoothness checks, out-of-fold probabilities). Write the loop as a "
            "training function of a session and record it with `tdx record` (README: Your own model) to have them")


def relabelled(dataset: Dataset, labels: np.ndarray | torch.Tensor) -> Dataset:
    """The dataset with its labels replaced by `labels` (N,), each a class of the dataset."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if labels.shape != (len(dataset),) or len(labels) and (labels.min() < 0 or labels.max() >= dataset.n_classes):
        raise SettingsError(f"labels must be {len(dataset)} classes in 0..{dataset.n_classes - 1}, one per training example")
    return dataclasses.replace(dataset, y=labels)


def retrain(
    run: Run,
    keep_mask: np.ndarray | None = None,
    *,
    weights: np.ndarray | torch.Tensor | None = None,
    labels: np.ndarray | torch.Tensor | None = None,
    seed: int | None = None,
    order_keeping: bool = False,
    task: Task | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> nn.Module:
    """The run's own training function called again; returns the final model (eval mode).

    Reshuffled (default): fresh draws of the rows keep_mask (N,) keeps, from `seed` (default the
    run's: with nothing removed that is the run itself, bit for bit). order_keeping: the recorded
    batches in their order with each example's loss weighted by weights (N,) (0: removed, its slot
    kept), from the run's seed. labels (N,) replaces the training labels (a cleaning experiment).
    """
    trained_by = run.training_function()
    if trained_by is None:
        raise SettingsError(why_not_retrainable(run))
    run.require_trusted()
    train_set, test_set = run.datasets()
    train_set = train_set if labels is None else relabelled(train_set, labels)
    n_train = len(train_set)
    if keep_mask is not None and np.asarray(keep_mask).shape != (n_train,):
        raise SettingsError(f"keep_mask has shape {np.asarray(keep_mask).shape}, expected ({n_train},) for run {run.run_id!r}")
    if order_keeping:
        if run.record is None:
            raise SettingsError(f"run {run.run_id!r} has no training record: an order-keeping retrain replays the recorded batches")
        if seed not in (None, run.recipe.seed):
            raise SettingsError("an order-keeping retrain keeps the run's own seed (its batches and randomness are the run's)")
        weights = np.asarray(keep_mask, dtype=np.float32) if weights is None and keep_mask is not None else weights
        draws = Draws(weights=None if weights is None else torch.as_tensor(weights), recorded=run.record)
        total = run.record.n_steps
    else:
        draws, kept = Draws(keep=keep_mask), n_train if keep_mask is None else int(np.sum(keep_mask))
        total = round(run.trajectory.n_steps * kept / max(1, n_train))
    seed = run.recipe.seed if seed is None else seed
    session = TrainingSession(
        model=initial_model(run.model, train_set, seed, device), train_set=train_set, test_set=test_set, seed=seed,
        options=trained_by.options, task=task, recipe=run.recipe if trained_by.function == RECIPE_FUNCTION else None, draws=draws,
        device=device, progress=progress, total_steps=total)
    model = call_function(load_function(trained_by.function), session)
    if order_keeping and draws.weights is not None and bool((draws.weights != 1).any()):
        _check_weights_changed_something(run, model)
    return model


def _check_weights_changed_something(run: Run, model: nn.Module) -> None:
    """Raise when an order-keeping retrain that removed examples ends exactly where the run ended: the weights were ignored."""
    final = run.load_model(-1)
    if all(torch.equal(mine, theirs) for mine, theirs in zip(model.state_dict().values(), final.state_dict().values())):
        raise SettingsError("the training function ignores the session's example weights: removing examples changed nothing; "
                            "compute the loss with batch.loss(losses)")


@dataclass
class TrainingResult:
    """A trained model with its trajectory and the states at the checkpoint steps."""

    model: nn.Module
    trajectory: Trajectory
    checkpoints: list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]


class _Collector:
    """fit_model's sink: the trajectory and the checkpoints' weights in memory, and the record when given a writer."""

    def __init__(self, model: nn.Module, record: RecordWriter | None, keep_checkpoints: bool,
                 on_batch: Callable[[int, torch.Tensor], None] | None):
        self.model, self.record, self.keep_checkpoints, self.on_batch = model, record, keep_checkpoints, on_batch
        self.trajectory, self.checkpoints, self.stage_index = Trajectory(), [], -1

    def stage(self, name: str) -> None:
        self.stage_index += 1

    def step(self, optimizer: torch.optim.Optimizer, indices: torch.Tensor, losses: torch.Tensor | None = None,
             margins: torch.Tensor | None = None) -> int:
        hyperparameters = optimizer_hyperparameters(optimizer)
        if self.on_batch is not None:
            self.on_batch(self.stage_index, indices)
        self.trajectory.add(self.stage_index, hyperparameters, len(indices))
        if self.record is not None:
            self.record.append(stage=self.stage_index, indices=indices, losses=losses, margins=margins, **hyperparameters)
        return self.trajectory.n_steps

    def checkpoint(self, epoch: int | None = None) -> None:
        if self.record is not None:
            self.record.flush()
        if self.keep_checkpoints:
            index = len(self.checkpoints)
            info = CheckpointInfo(index, self.trajectory.n_steps, self.stage_index, epoch or 1, f"ckpt_{index:04d}.safetensors")
            self.checkpoints.append((info, {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}))


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
    task: Task | None = None,
) -> TrainingResult:
    """Train a fresh model through every stage of the recipe (train_recipe, no workspace); same inputs give identical weights.

    With a record writer, every step's hyperparameters, batch rows and per-example losses are
    appended to it (flushed at every checkpoint and at the end). on_batch(stage, rows) hears every step.
    """
    seed = recipe.seed if seed is None else seed
    model = initial_model(model_spec, train_set, seed, device)
    collector = _Collector(model, record, keep_checkpoints, on_batch)
    session = TrainingSession(model=model, train_set=train_set, test_set=None, seed=seed, task=task, recipe=recipe,
                              draws=Draws(keep=keep_mask), sink=collector, device=device, progress=progress)
    call_function(train_recipe, session)
    if record is not None:
        record.flush()
    return TrainingResult(model, collector.trajectory, collector.checkpoints)
