"""Training that records its trajectory: recipes with stages, checkpoints, `train` and `retrain`.

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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, DataSpec, load_dataset
from .errors import CheckpointError, SettingsError, TdxError
from .methods.base import ProgressFn, no_progress
from .models import ModelSpec, build_model
from .store import Workspace, atomic_write_json, check_name, file_sha256, load_tensors, read_json, save_tensors

RUN_FORMAT = 1


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Stage:
    """One stage of training: optimizer, schedule and which data it sees."""

    name: str = field(default="train", metadata=_help("stage name shown in the app, e.g. pretrain / finetune"))
    epochs: int = field(default=10, metadata=_help("passes over the stage's data"))
    optimizer: str = field(default="sgd", metadata=_help("sgd (with momentum) or adam"))
    lr: float = field(default=0.05, metadata=_help("peak learning rate"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (Adam: beta1)"))
    weight_decay: float = field(default=1e-4, metadata=_help("L2 weight decay"))
    batch_size: int = field(default=64, metadata=_help("examples per optimizer step"))
    schedule: str = field(default="constant", metadata=_help("constant, step, cosine or linear (decay to 0)"))
    step_epochs: int = field(default=5, metadata=_help("step schedule: epochs between decays"))
    step_gamma: float = field(default=0.1, metadata=_help("step schedule: decay factor"))
    warmup_steps: int = field(default=0, metadata=_help("linear warm-up from 0 over this many steps"))
    classes: tuple[int, ...] | None = field(default=None, metadata=_help("train only on these labels (None: all)"))
    transform: str = field(default="none", metadata=_help("none, rotate (90 degrees) or noise (Gaussian pixel noise)"))
    noise_std: float = field(default=0.3, metadata=_help("std of the pixel noise for transform=noise"))

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "optimizer": self.optimizer in ("sgd", "adam"),
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "schedule": self.schedule in ("constant", "step", "cosine", "linear"),
            "step_epochs": self.step_epochs >= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "transform": self.transform in ("none", "rotate", "noise"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SettingsError(f"stage {self.name!r}: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints to keep; the end of every stage is always kept."""

    every_epochs: int | None = field(default=1, metadata=_help("keep one after every k epochs of each stage"))
    count: int | None = field(default=None, metadata=_help("instead: C checkpoints evenly spaced over all steps"))

    def __post_init__(self) -> None:
        if (self.every_epochs is None) == (self.count is None):
            raise SettingsError("checkpoint policy: set exactly one of every_epochs and count")
        if (self.every_epochs or 1) < 1 or (self.count or 1) < 1:
            raise SettingsError("checkpoint policy: every_epochs and count must be at least 1")


@dataclass(frozen=True)
class Recipe:
    """How a run is trained: stages in order, a seed, and the checkpoint policy."""

    stages: tuple[Stage, ...] = field(default=(Stage(),), metadata=_help("training stages, run in order"))
    seed: int = field(default=0, metadata=_help("seed of initialisation and data order"))
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy, metadata=_help("which checkpoints to keep"))

    def __post_init__(self) -> None:
        if not self.stages:
            raise SettingsError("recipe: at least one stage is needed")

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "Recipe":
        """Inverse of dataclasses.asdict (as stored in run.json)."""
        return cls(
            stages=tuple(Stage(**stage) for stage in payload["stages"]),
            seed=payload["seed"],
            checkpoints=CheckpointPolicy(**payload["checkpoints"]),
        )


@dataclass
class Trajectory:
    """Per optimizer step (index i = step i+1): stage, learning rate, momentum, batch size."""

    stage: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    momentum: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    optimizer: list[str] = field(default_factory=list)

    def record(self, stage_index: int, stage: Stage, lr: float, batch_size: int) -> None:
        self.stage.append(stage_index)
        self.lr.append(lr)
        self.momentum.append(stage.momentum if stage.optimizer == "sgd" else 0.0)
        self.batch_size.append(batch_size)
        self.optimizer.append(stage.optimizer)

    @property
    def n_steps(self) -> int:
        return len(self.lr)


@dataclass(frozen=True)
class CheckpointInfo:
    """A saved checkpoint: weights after `step` optimizer steps."""

    index: int
    step: int
    stage: int
    epoch: int
    file: str
    test_accuracy: float | None = None
    sha256: str = ""
    size: int = 0


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


def stage_transform(stage: Stage, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The stage's input transform of the whole training set x (N, ...).

    Pixel noise is drawn once for all N examples from the seed, so an example gets the same
    noise whichever others are masked out by `retrain`.
    """
    if stage.transform == "rotate":
        return torch.rot90(x, 1, dims=(-2, -1))
    if stage.transform == "noise":
        return x + stage.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x


def stage_indices(stage: Stage, labels: torch.Tensor, keep_mask: np.ndarray | None) -> torch.Tensor:
    """Training-set indices a stage trains on: its classes, minus masked-out examples."""
    selected = torch.ones(len(labels), dtype=torch.bool)
    if stage.classes is not None:
        selected &= torch.isin(labels, torch.tensor(stage.classes))
    if keep_mask is not None:
        selected &= torch.as_tensor(np.asarray(keep_mask, dtype=bool))
    return torch.nonzero(selected).squeeze(1)


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
def training_threads(model: nn.Module) -> Iterator[None]:
    """Train small models on one CPU thread, restoring the caller's setting afterwards."""
    previous = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
) -> TrainingResult:
    """Train a fresh model through every stage of the recipe; same inputs give identical weights."""
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
    with training_threads(model):
        for stage_index, (stage, indices, spe) in enumerate(zip(recipe.stages, per_stage, steps_per_epoch)):
            stage_x = stage_transform(stage, train_set.x, seed + stage_index)[indices].to(device)
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
                    F.cross_entropy(model(stage_x[batch.to(device)]), stage_y[batch.to(device)]).backward()
                    optimizer.step()
                    trajectory.record(stage_index, stage, optimizer.param_groups[0]["lr"], len(batch))
                    step = trajectory.n_steps
                    progress(step, total_steps)
                    if keep_checkpoints and step in save_steps:
                        info = CheckpointInfo(len(checkpoints), step, stage_index, epoch + 1, f"ckpt_{len(checkpoints):04d}.safetensors")
                        checkpoints.append((info, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
                    model.train()
    model.eval()
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


@dataclass
class Run:
    """A trained model run in a workspace: specs, recipe, trajectory and checkpoints."""

    run_id: str
    workspace: Workspace
    data: DataSpec
    model: ModelSpec
    recipe: Recipe
    trajectory: Trajectory
    checkpoints: list[CheckpointInfo]
    metrics: dict[str, Any]
    created: str = ""
    _datasets: tuple[Dataset, Dataset] | None = field(default=None, repr=False, compare=False)

    @property
    def directory(self) -> Path:
        return self.workspace.run_dir(self.run_id)

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, test) exactly as the run saw them (noise included), loaded once."""
        if self._datasets is None:
            self._datasets = load_dataset(self.data)
        return self._datasets

    def load_model(self, checkpoint: int = -1, device: torch.device | str = "cpu") -> nn.Module:
        """The model at a checkpoint index (negative counts from the end), in eval mode."""
        info = self.checkpoints[checkpoint]
        train_set, _ = self.datasets()
        model = build_model(self.model, train_set.input_shape, train_set.n_classes)
        path = self.directory / "checkpoints" / check_name(info.file, "checkpoint file")
        state = load_tensors(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path} does not fit model {self.model.name} {self.model.options}: restore the checkpoint this run "
                f"trained, or train the run again ({exc})"
            ) from exc
        if not all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point()):
            raise CheckpointError(f"{path} holds NaN or Inf weights: the run diverged; retrain with a lower learning rate")
        return model.to(device).eval()

    def verify(self) -> list[str]:
        """Problems found with the run's checkpoints (missing, or bytes that differ from run.json); [] if none."""
        problems = []
        for info in self.checkpoints:
            path = self.directory / "checkpoints" / check_name(info.file, "checkpoint file")
            if not path.is_file():
                problems.append(f"missing checkpoint {path}")
            elif info.sha256 and (path.stat().st_size != info.size or file_sha256(path) != info.sha256):
                problems.append(f"checkpoint {path} does not match the checksum recorded in run.json: restore it or train the run again")
        return problems

    def to_json(self) -> dict[str, Any]:
        """The run.json payload."""
        return {
            "format": RUN_FORMAT,
            "id": self.run_id,
            "created": self.created,
            "data": asdict(self.data),
            "model": asdict(self.model),
            "recipe": asdict(self.recipe),
            "trajectory": asdict(self.trajectory),
            "checkpoints": [asdict(info) for info in self.checkpoints],
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, workspace: Workspace, payload: dict[str, Any]) -> "Run":
        """Inverse of to_json."""
        if payload.get("format") != RUN_FORMAT:
            raise TdxError(f"run {payload.get('id')!r} uses run format {payload.get('format')}, expected {RUN_FORMAT}")
        data = dict(payload["data"])
        return cls(
            run_id=payload["id"],
            workspace=workspace,
            data=DataSpec(**data),
            model=ModelSpec(**payload["model"]),
            recipe=Recipe.from_dict(payload["recipe"]),
            trajectory=Trajectory(**payload["trajectory"]),
            checkpoints=[CheckpointInfo(**info) for info in payload["checkpoints"]],
            metrics=payload.get("metrics", {}),
            created=payload.get("created", ""),
        )


def load_run(workspace: Workspace | str | Path, run_id: str) -> Run:
    """A run from its workspace; an unknown id raises an error listing the runs that exist."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    return Run.from_json(workspace, read_json(workspace.run_dir(run_id) / "run.json"))


def list_runs(workspace: Workspace | str | Path) -> list[Run]:
    """Every run in the workspace, sorted by id."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    return [load_run(workspace, run_id) for run_id in workspace.run_ids()]


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
    result = fit_model(train_set, model_spec, recipe, device=device, progress=progress)
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
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write_json(directory / "run.json", run.to_json())
    return run


def retrain(
    run: Run,
    keep_mask: np.ndarray,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> nn.Module:
    """The run's whole pipeline (every stage) re-run on the kept examples; returns the final model."""
    train_set, _ = run.datasets()
    keep_mask = np.asarray(keep_mask, dtype=bool)
    if keep_mask.shape != (len(train_set),):
        raise SettingsError(f"keep_mask has shape {keep_mask.shape}, expected ({len(train_set)},) for run {run.run_id!r}")
    return fit_model(
        train_set, run.model, run.recipe, keep_mask=keep_mask, seed=seed, keep_checkpoints=False, device=device, progress=progress
    ).model
