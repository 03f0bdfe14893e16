"""A trained run and its specs: the recipe it was trained by, its trajectory and checkpoints.

`Run` is the noun everything downstream uses: the front door, the evaluations, the app. It
lives in runs/<id>/run.json (specs, recipe, per-step trajectory, checkpoint list, metrics) beside
checkpoints/*.safetensors. Training itself (training.py) builds Runs; this module only describes
and loads them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset, DataSpec, load_dataset
from ..errors import CheckpointError, DataError, SettingsError, TdxError
from ..models import ModelSpec, build_model
from ..numerics.segments import step_weights
from ..store import Artifact, Workspace, check_name, file_sha256, load_tensors, read_json
from ..trust import require_trusted
from .record import RECORD_DIR, TrainingRecord

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

    def members(self, labels: np.ndarray) -> np.ndarray:
        """(N,) bool: which training examples (by label) this stage trains on: its classes, or all."""
        labels = np.asarray(labels)
        return np.ones(len(labels), dtype=bool) if self.classes is None else np.isin(labels, self.classes)

    def view(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The training inputs x (N, ...) as this stage sees them: its transform applied (x itself for none).

        Pixel noise is drawn once for all N examples from the seed (the run's seed + the stage's
        index), so an example gets the same noise whichever others are masked out by `retrain`.
        """
        if self.transform == "rotate":
            return torch.rot90(x, 1, dims=(-2, -1))
        if self.transform == "noise":
            return x + self.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return x


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

    def add(self, stage_index: int, hyperparameters: dict[str, Any], batch_size: int) -> None:
        """One more step, from the optimizer's hyperparameters after it (record.optimizer_hyperparameters)."""
        self.stage.append(stage_index)
        self.lr.append(float(hyperparameters["lr"]))
        self.momentum.append(float(hyperparameters["momentum"]) if hyperparameters["optimizer"] == "sgd" else 0.0)
        self.batch_size.append(batch_size)
        self.optimizer.append(str(hyperparameters["optimizer"]))

    @property
    def n_steps(self) -> int:
        return len(self.lr)

    @classmethod
    def from_record(cls, record: TrainingRecord) -> "Trajectory":
        """The per-step schedule of a training record (momentum 0 for steps of optimizers other than SGD)."""
        is_sgd = np.array([name == "sgd" for name in record.optimizer], dtype=bool)
        return cls(stage=record.stage.tolist(), lr=record.lr.tolist(), momentum=np.where(is_sgd, record.momentum, 0.0).tolist(),
                   batch_size=record.batch_size.tolist(), optimizer=list(record.optimizer))


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


RECIPE_FUNCTION = "attribution_core.runs.training:train_recipe"
"""The training function of tdx's own trainer (`tdx train`, the demo): the run's recipe, stage by stage."""


@dataclass(frozen=True)
class TrainedBy:
    """The training function that made a run (runs/session.py), so that tdx can call it again: retrain it and replay it.

    function: "package.module:function", called as function(session); options: what it was given (`--set key=value`);
    augment: (first step, "package.module:augment" or None) where the augmentation of session.batches changed, so
    replay draws each step's augmentation again; optimizer_starts: the steps where a new optimizer object took its
    first step (its state starts from zero there); not_replayable: what the function did that replay cannot do
    again (inputs of its own, parameter groups with their own hyperparameters), empty when replay can.
    """

    function: str
    options: dict[str, Any] = field(default_factory=dict)
    augment: tuple[tuple[int, str | None], ...] = ()
    optimizer_starts: tuple[int, ...] = ()
    not_replayable: tuple[str, ...] = ()

    def augment_at(self, step: int) -> str | None:
        """The augmentation (import path) in force at a step (1-based), or None."""
        current = None
        for first, path in self.augment:
            if first > step:
                break
            current = path
        return current

    def code(self) -> list[str]:
        """The import paths ("module:attribute") this training imports: the function and every augmentation."""
        return [self.function, *(path for _, path in self.augment if path is not None)]

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> "TrainedBy":
        """Inverse of dataclasses.asdict (as stored in run.json)."""
        return cls(function=payload["function"], options=dict(payload.get("options", {})),
                   augment=tuple((int(first), path) for first, path in payload.get("augment", [])),
                   optimizer_starts=tuple(int(step) for step in payload.get("optimizer_starts", [])),
                   not_replayable=tuple(payload.get("not_replayable", [])))


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
    record: TrainingRecord | None = field(default=None, repr=False, compare=False)
    """What every step trained on (record.py); None for runs made before records existed."""
    trained_by: TrainedBy | None = None
    """The training function that made the run (None: recorded by the Recorder, imported, or trained by tdx before
    runs named their function; see training_function)."""
    _datasets: tuple[Dataset, Dataset] | None = field(default=None, repr=False, compare=False)
    _views: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def directory(self) -> Path:
        return self.workspace.run_dir(self.run_id)

    @property
    def origin(self) -> str:
        """How the run came to be: "trained" (by a training function: tdx's recipe or a user's), "recorded" or "imported"."""
        return self.metrics.get("origin", "trained")

    def training_function(self) -> TrainedBy | None:
        """The training function tdx can call again for this run, or None (a run recorded or imported outside one).

        Runs tdx trained before runs named their function were trained by the recipe function.
        """
        if self.trained_by is not None:
            return self.trained_by
        return TrainedBy(RECIPE_FUNCTION) if self.origin == "trained" else None

    def code(self) -> list[str]:
        """Every module this run imports when it is opened, retrained or replayed (its factory, its training function)."""
        paths = [self.model.name] if ":" in self.model.name else []
        paths += self.trained_by.code() if self.trained_by is not None else []
        return list(dict.fromkeys(path.partition(":")[0] for path in paths))

    def require_trusted(self) -> None:
        """Raise UntrustedCodeError, importing nothing, when the run names code the user has not agreed to run (trust.py)."""
        require_trusted(self.code(), self.workspace.root, f"run {self.run_id!r}",
                        f"tdx trust {self.run_id} --workspace {self.workspace.root}")

    def checkpoint_index(self, checkpoint: int) -> int:
        """A checkpoint's index counted from the start (negative ones count from the end), checked to exist."""
        return self.resolve_checkpoints([checkpoint], [])[0]

    def resolve_checkpoints(self, checkpoints: list[int] | None, default: list[int]) -> list[int]:
        """Chosen checkpoint indices, sorted and unique (negative ones count from the end), or the default when None."""
        if checkpoints is None:
            return default
        n = len(self.checkpoints)
        chosen = sorted({index + n if index < 0 else index for index in checkpoints})
        if not chosen or chosen[0] < 0 or chosen[-1] >= n:
            raise SettingsError(f"checkpoints {checkpoints} out of range: run {self.run_id!r} has checkpoints 0..{n - 1}")
        return chosen

    def checkpoint_learning_rates(self, checkpoints: list[int]) -> list[float]:
        """The learning rate in force at each checkpoint (that of the step just before it)."""
        return [self.trajectory.lr[self.checkpoints[index].step - 1] for index in checkpoints]

    def train_view(self, stage: int) -> torch.Tensor:
        """The training inputs (N, ...) as stage `stage` saw them (its transform applied), computed once per stage."""
        if stage not in self._views:
            train_set, _ = self.datasets()
            self._views[stage] = self.recipe.stages[stage].view(train_set.x, self.recipe.seed + stage)
        return self._views[stage]

    def draw_weights(self, first_step: int, last_step: int) -> np.ndarray:
        """(N,) how much each example was trained on in steps first_step..last_step (1-based, inclusive), mean 1.

        Each step counts with its η / (1 − momentum) (segments.step_weights). From the record
        when the run has one (TrainingRecord.draw_weights); otherwise what the recipe implies:
        within each stage, its examples (its classes) share that stage's steps evenly.
        """
        lr, momentum, optimizers = (np.asarray(self.trajectory.lr), np.asarray(self.trajectory.momentum), self.trajectory.optimizer)
        weights = step_weights(lr, momentum, optimizers)
        train_set, _ = self.datasets()
        if self.record is not None:
            return self.record.draw_weights(first_step, last_step, len(train_set), weights)
        stages, steps = np.asarray(self.trajectory.stage), slice(first_step - 1, last_step)
        drawn = np.zeros(len(train_set))
        for stage in np.unique(stages[steps]):
            members = self.recipe.stages[stage].members(train_set.y.numpy())
            drawn[members] += weights[steps][stages[steps] == stage].sum() / members.sum()
        return len(train_set) * drawn / weights[steps].sum()

    def checkpoint_weights(self, checkpoint: int) -> np.ndarray:
        """(N,) draw_weights over the steps since the checkpoint before this one (TracIn's stretch of training)."""
        step = self.checkpoints[checkpoint].step
        previous = self.checkpoints[checkpoint - 1].step if checkpoint > 0 else 0
        return self.draw_weights(previous + 1, step)

    def artifact(self, kind: str, **inputs: Any) -> Artifact:
        """The run's stored result of a kind, keyed by this run's identity and everything else it is computed from."""
        return self.workspace.artifact(self.run_id, kind, {"run": self.run_id, "created": self.created, **inputs})

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, test) exactly as the run saw them (noise included), loaded once."""
        if self._datasets is None:
            self._datasets = load_dataset(self.data)
        return self._datasets

    def load_model(self, checkpoint: int = -1, device: torch.device | str = "cpu") -> nn.Module:
        """The model at a checkpoint index (negative counts from the end), in eval mode."""
        info = self.checkpoints[checkpoint]
        train_set, _ = self.datasets()
        self.require_trusted()
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
            **({"record": {"steps": self.record.n_steps, "example_steps": len(self.record.indices)}} if self.record is not None
               else {"trajectory": asdict(self.trajectory)}),  # a record holds the per-step schedule: run.json stays small
            "checkpoints": [asdict(info) for info in self.checkpoints],
            "metrics": self.metrics,
            **({"training": asdict(self.trained_by)} if self.trained_by is not None else {}),
        }

    @classmethod
    def from_json(cls, workspace: Workspace, payload: dict[str, Any]) -> "Run":
        """Inverse of to_json."""
        if payload.get("format") != RUN_FORMAT:
            raise TdxError(f"run {payload.get('id')!r} uses run format {payload.get('format')}, expected {RUN_FORMAT}")
        data = dict(payload["data"])
        record = TrainingRecord.load(workspace.run_dir(payload["id"]) / RECORD_DIR) if "record" in payload else None
        if "record" in payload and (record is None or record.n_steps != payload["record"]["steps"]):
            raise DataError(f"run {payload['id']!r}: its training record (record/) is missing or incomplete; train the run again")
        return cls(
            run_id=payload["id"],
            workspace=workspace,
            data=DataSpec(**data),
            model=ModelSpec(**payload["model"]),
            recipe=Recipe.from_dict(payload["recipe"]),
            trajectory=Trajectory.from_record(record) if record is not None else Trajectory(**payload["trajectory"]),
            checkpoints=[CheckpointInfo(**info) for info in payload["checkpoints"]],
            metrics=payload.get("metrics", {}),
            created=payload.get("created", ""),
            record=record,
            trained_by=TrainedBy.from_json(payload["training"]) if "training" in payload else None,
        )


def load_run(workspace: Workspace | str | Path, run_id: str) -> Run:
    """A run from its workspace; an unknown id raises an error listing the runs that exist."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    return Run.from_json(workspace, read_json(workspace.run_dir(run_id) / "run.json"))


def list_runs(workspace: Workspace | str | Path) -> list[Run]:
    """Every run in the workspace, sorted by id."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    return [load_run(workspace, run_id) for run_id in workspace.run_ids()]
