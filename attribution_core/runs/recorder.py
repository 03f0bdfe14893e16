"""Record any PyTorch training loop as a tdx run: `Recorder`, a dozen lines in your own loop.

    from attribution_core.data import DataSpec
    from attribution_core.recorder import Recorder

    model = my_factory((1, 28, 28), 10)
    with Recorder("workspace", "my-run", model=model, factory="mypackage.models:my_factory",
                  data=DataSpec(source="sample")) as recorder:
        x, y = recorder.train_set.x, recorder.train_set.y      # train on these rows: the run reloads them
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(10):
            for batch in torch.randperm(len(x)).split(64):
                losses = F.cross_entropy(model(augment(x[batch])), y[batch], reduction="none")
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
                recorder.step(optimizer, batch, losses=losses)  # right after optimizer.step()
            recorder.checkpoint()
    # on leaving the block: the final checkpoint, metrics and run.json; `tdx app --workspace workspace` opens it

What a recorded run is:
- data: a DataSpec (any source), so `run.datasets()` reloads exactly the examples the loop was handed,
  in the same order; the indices given to `step` are rows of `recorder.train_set`. In-memory arrays
  (`ArrayData`) are stored with the run as runs/<id>/data.npz (written atomically) and the run's
  DataSpec is `npz` at that file's absolute path: moving the workspace breaks that path.
- model: the factory ("package.module:factory", a ModelSpec name; built-in mlp / cnn / resnet9 too)
  rebuilds the architecture when the run is opened; the model handed in must have exactly the
  factory's parameters (names and shapes), checked at open. The factory must be importable where the
  run is opened (the app, the CLI): define it in a module of your package, not in a script's __main__.
- initial weights: the model's weights at open are kept as runs/<id>/initial.safetensors (not a
  checkpoint: checkpoints follow optimizer steps).
- record: every step's batch rows, hyperparameters (read from the optimizer's first parameter group)
  and the per-example losses / margins you pass (NaN where not given), as tdx's own trainer writes it;
  with RecorderSettings(margins_from_losses=True) the margins follow from plain cross-entropy losses
  (as the trainer's do), at no cost per step.
  Random augmentation in the loop is not recorded: attribution uses the un-augmented example.
- recipe: descriptive only. A plain loop has no recipe tdx could replay; each `stage(name)` becomes a
  Stage with transform "none", the stage's peak learning rate, its first step's momentum and weight
  decay, its largest batch, schedule "constant" (the true per-step schedule is in the record) and
  epochs = passes over the training set its steps drew (rounded up). metrics["origin"] is "recorded".
- retraining and replay: tdx cannot call a plain loop again, so the evaluations that retrain (LDS
  ground truth, counterfactual and smoothness checks, out-of-fold mislabel probabilities) and exact
  replay do not apply to a recorded run. Write the loop as a training function (session.py) and
  record it with `record_run` / `tdx record` to have them: the session then records through this
  same Recorder, and the run names its function (run.json "training").
- a loop that stops (an exception in the block, or the process killed) leaves a run that lists as
  incomplete, never a broken one: runs/<id>/incomplete.json is written at open and at each checkpoint,
  run.json (which makes a run complete, Workspace.run_ids) only by `finish`; see `list_incomplete`.
"""
from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset, DataSpec, dataset_from_arrays, load_dataset
from ..errors import DataError, SettingsError, TdxError, WorkspaceError
from ..models import BUILDERS, ModelSpec, build_model
from ..store import Workspace, atomic_write_bytes, atomic_write_json, file_sha256, read_json, save_tensors
from ..trust import trust
from .record import RECORD_DIR, RecordWriter, TrainingRecord, optimizer_hyperparameters
from .run import CheckpointInfo, CheckpointPolicy, Recipe, Run, Stage, TrainedBy, Trajectory

ORIGIN_RECORDED = "recorded"
"""metrics["origin"] of a run recorded from a user's own plain loop (a training function's run has none: "trained")."""

INCOMPLETE_MARKER = "incomplete.json"
"""The file that marks a run folder as being (or having stopped) recording; run.json replaces it."""

INITIAL_WEIGHTS = "initial.safetensors"
"""The model's weights when the Recorder opened (step 0): your initialisation or pretrained weights, which a run's
seed cannot reproduce; kept for exact replay (replay_engine.py rebuilds tdx's own runs' initial weights from their seed)."""

DATA_FILE = "data.npz"
"""Where in-memory data (ArrayData) is stored in the run folder."""

_WRAPPER_PREFIXES = {"module.": "model.module (DistributedDataParallel / DataParallel)", "_orig_mod.": "model._orig_mod (torch.compile)"}


@dataclass(frozen=True)
class RecorderSettings:
    """How the recorder writes: record chunk size, per-checkpoint evaluation, replacing an existing run."""

    flush_every: int = field(default=1024, metadata={"help": (
        "steps per record chunk file (a checkpoint flushes too); a killed loop loses at most these")})
    margins_from_losses: bool = field(default=False, metadata={"help": (
        "the losses given to step are plain cross-entropy (no label smoothing, no class weights): derive each example's margin from its "
        "loss, as tdx's trainer does")})
    evaluate_checkpoints: bool = field(default=True, metadata={"help": (
        "test accuracy of every checkpoint (one pass over the test set each)")})
    eval_batch_size: int = field(default=1024, metadata={"help": "examples per forward pass when evaluating"})
    overwrite: bool = field(default=False, metadata={"help": "replace a complete run of the same id (its run.json and checkpoints)"})

    def __post_init__(self) -> None:
        if self.flush_every < 1 or self.eval_batch_size < 1:
            raise SettingsError(f"recorder settings: flush_every and eval_batch_size must be at least 1, "
                                f"got {self.flush_every}, {self.eval_batch_size}")


@dataclass(frozen=True, eq=False)
class ArrayData:
    """Training and test data held in memory: images (n, H, W), (n, H, W, C) or (n, C, H, W), uint8 or float, and integer labels.

    Stored with the run as data.npz; uint8 pixels become x / 255 (the npz loader's rule), floats are kept.
    """

    x_train: np.ndarray | torch.Tensor
    y_train: np.ndarray | torch.Tensor
    x_test: np.ndarray | torch.Tensor
    y_test: np.ndarray | torch.Tensor
    class_names: Sequence[str] | None = None
    ids_train: np.ndarray | torch.Tensor | None = None
    """Optional stable example ids (n_train,) (default 0..n_train-1): a cleaned data set keeps the ids its examples had."""
    ids_test: np.ndarray | torch.Tensor | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz payload (keys the npz loader reads)."""
        payload = {name: _numpy(getattr(self, name)) for name in ("x_train", "y_train", "x_test", "y_test")}
        if self.class_names is not None:
            payload["class_names"] = np.asarray([str(name) for name in self.class_names])
        payload |= {name: _numpy(getattr(self, name)) for name in ("ids_train", "ids_test") if getattr(self, name) is not None}
        return payload

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, test) as the npz loader will read the stored file (class names shared by both splits)."""
        payload = self.arrays()
        train = dataset_from_arrays(payload["x_train"], payload["y_train"], self.class_names, ids=payload.get("ids_train"),
                                    where="ArrayData [x_train/y_train]")
        test = dataset_from_arrays(payload["x_test"], payload["y_test"], self.class_names, ids=payload.get("ids_test"),
                                   where="ArrayData [x_test/y_test]")
        names = max(train.class_names, test.class_names, key=len)
        return replace(train, class_names=names), replace(test, class_names=names)


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def factory_name(factory: str | Callable[..., nn.Module]) -> str:
    """The ModelSpec name of a factory: a "package.module:factory" string or built-in name as given, or an importable function's path."""
    if isinstance(factory, str):
        name = factory
    else:
        module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
        if module is None or module == "__main__" or "." in qualname or not qualname:
            raise SettingsError(
                f"model factory {factory!r} cannot be found again by name (defined in a script's __main__, inside a "
                "function or a class): define it at the top level of an importable module and pass it, or its "
                "'package.module:factory' path, as factory="
            )
        name = f"{module}:{qualname}"
    if ":" not in name and name not in BUILDERS:
        raise SettingsError(f"model factory {name!r}: give 'package.module:factory' or one of {sorted(BUILDERS)}")
    return name


def check_architecture(state: dict[str, torch.Tensor], spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int,
                       what: str) -> nn.Module:
    """The factory's model for the data, after checking `state` has exactly its parameter names and shapes (else a
    SettingsError naming them)."""
    with torch.random.fork_rng(devices=[]):  # building the reference must not move the caller's RNG (their init, data order)
        reference = build_model(spec, input_shape, n_classes)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if given == expected:
        return reference
    built = f"factory {spec.name!r} {spec.options or ''}".rstrip()
    for prefix, unwrap in _WRAPPER_PREFIXES.items():
        if given and all(name.startswith(prefix) for name in given) and {n.removeprefix(prefix): s for n, s in given.items()} == expected:
            raise SettingsError(f"{what}: every parameter name starts with {prefix!r}; pass the unwrapped model, {unwrap}")
    problems = [f"parameter {name!r} has shape {list(given[name])} where {built} builds {list(shape)}"
                for name, shape in expected.items() if name in given and given[name] != shape]
    problems += [f"{built} has parameter {name!r} {list(shape)} that {what} lacks" for name, shape in expected.items() if name not in given]
    problems += [f"{what} has parameter {name!r} {list(shape)} that {built} does not build"
                 for name, shape in given.items() if name not in expected]
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise SettingsError(
        f"{what} does not match the architecture of {built} for inputs {list(input_shape)} and {n_classes} classes: {shown}. "
        "Pass the factory (and options) that built this model"
    )


def utc_now() -> str:
    """The current UTC time as run.json's `created` stores it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return {"accuracy": correct / max(1, len(dataset)), "loss": loss / max(1, len(dataset))}


def evaluate_keeping_mode(model: nn.Module, dataset: Dataset, batch_size: int) -> dict[str, float]:
    """evaluate, then the model back in the train/eval mode it was in (the loop goes on training)."""
    was_training = model.training
    try:
        return evaluate(model, dataset, batch_size)
    finally:
        model.train(was_training)


def write_marker(directory: Path, payload: dict[str, Any]) -> None:
    """Write (atomically) the marker that says the run folder holds a run being recorded or imported, not yet complete."""
    atomic_write_json(directory / INCOMPLETE_MARKER, {**payload, "updated": utc_now()})


def refuse_complete_run(directory: Path, overwrite: bool, run_id: str, root: Path) -> None:
    """Raise unless the run folder holds no complete run (run.json), or overwrite allows replacing it."""
    if (directory / "run.json").is_file() and not overwrite:
        raise WorkspaceError(
            f"run {run_id!r} exists already in workspace {root}: choose another run id, or pass overwrite=True to replace it"
        )


def clear_stale_run(directory: Path) -> None:
    """Drop an old run.json and old checkpoints from a run folder about to hold a new run.

    Call it after writing the marker: a crash in between then leaves an incomplete run, never a folder
    nobody lists. (RecordWriter clears an old record itself.)
    """
    (directory / "run.json").unlink(missing_ok=True)
    for stale in (directory / "checkpoints").glob("ckpt_*.safetensors"):
        stale.unlink()


@dataclass
class _StageLog:
    """What the steps of one recorded stage did, to describe it as a Stage."""

    name: str
    steps: int = 0
    examples: int = 0
    peak_lr: float = 0.0
    max_batch: int = 0
    first: dict[str, float | str] = field(default_factory=dict)

    def add(self, hyperparameters: dict[str, float | str], batch: int) -> None:
        self.first = self.first or dict(hyperparameters)
        self.steps += 1
        self.examples += batch
        self.peak_lr = max(self.peak_lr, float(hyperparameters["lr"]))
        self.max_batch = max(self.max_batch, batch)

    def describe(self, n_train: int) -> Stage:
        """The descriptive Stage (see the module docstring: nothing here can be replayed)."""
        return Stage(
            name=self.name, epochs=max(1, math.ceil(self.examples / n_train)),
            optimizer="adam" if self.first["optimizer"] in ("adam", "adamw") else "sgd",
            # a Stage needs lr > 0; a loop that never stepped the weights is still described
            lr=self.peak_lr if self.peak_lr > 0 else 1e-12,
            momentum=min(max(float(self.first["momentum"]), 0.0), 0.999), weight_decay=max(float(self.first["weight_decay"]), 0.0),
            batch_size=max(1, self.max_batch), schedule="constant", transform="none",
        )


class Recorder:
    """Records a plain PyTorch training loop into a workspace run (see the module docstring); use it as a context manager."""

    def __init__(
        self,
        workspace: Workspace | str | Path,
        run_id: str,
        *,
        model: nn.Module,
        factory: str | Callable[..., nn.Module],
        data: DataSpec | ArrayData,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        settings: RecorderSettings | None = None,
    ):
        """Open a run: check the model against the factory and the data, then mark the run folder as recording."""
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.run_id, self.model, self.seed = run_id, model, seed
        self.settings = settings or RecorderSettings()
        self.directory = self.workspace.run_dir(run_id, must_exist=False)
        refuse_complete_run(self.directory, self.settings.overwrite, run_id, self.workspace.root)
        if not isinstance(model, nn.Module):
            raise SettingsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model_spec = ModelSpec(factory_name(factory), dict(options or {}))
        if ":" in self.model_spec.name:  # the user runs this code already: opening the run later needs no consent
            trust([self.model_spec.name.partition(":")[0]], self.workspace.root)
        if isinstance(data, ArrayData):
            payload = data.arrays()
            train_set, test_set = data.datasets()
        elif isinstance(data, DataSpec):
            train_set, test_set = load_dataset(data)
        else:
            raise SettingsError(f"data must be a DataSpec or an ArrayData, got {type(data).__name__}")
        # the run rebuilds the model for the training set's shape and classes (Run.load_model): check exactly that
        check_architecture(model.state_dict(), self.model_spec, train_set.input_shape, train_set.n_classes,
                           "the model passed to the Recorder")
        self.created = utc_now()
        self._marker = {"run": run_id, "origin": ORIGIN_RECORDED, "created": self.created, "status": "recording",
                        "steps": 0, "checkpoints": 0, "stage": "train", "error": None}
        write_marker(self.directory, self._marker)
        clear_stale_run(self.directory)
        save_tensors(self.directory / INITIAL_WEIGHTS, model.state_dict(), metadata={"step": "0"})
        if isinstance(data, ArrayData):
            buffer = _npz_bytes(payload)
            atomic_write_bytes(self.directory / DATA_FILE, buffer)
            data = DataSpec(source="npz", path=str(self.directory / DATA_FILE))
            train_set, test_set = _reloaded(data, train_set, test_set)
        self.data, self.train_set, self.test_set = data, train_set, test_set
        self.checkpoints: list[CheckpointInfo] = []
        self.run: Run | None = None
        self._writer = RecordWriter(self.directory / RECORD_DIR, flush_every=self.settings.flush_every,
                                    margins_from_losses=self.settings.margins_from_losses)
        self._stages = [_StageLog("train")]
        self._steps = 0
        self._closed = False
        self._started = time.perf_counter()

    @property
    def steps(self) -> int:
        """Optimizer steps recorded so far."""
        return self._steps

    @property
    def n_train(self) -> int:
        """Rows of the training set (valid indices are 0..n_train-1)."""
        return len(self.train_set)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        """Finish on a normal exit; after an exception keep what was written and mark the run as stopped (the exception goes on)."""
        if exc is None:
            try:
                self.finish()
            except BaseException as failure:  # e.g. no step recorded: the run stays incomplete and says why
                self.abort(f"finish failed: {type(failure).__name__}: {failure}")
                raise
        else:
            self.abort(f"{exc_type.__name__}: {exc}" if exc_type is not None else str(exc))

    def step(self, optimizer: torch.optim.Optimizer, indices: Sequence[int] | np.ndarray | torch.Tensor,
             losses: torch.Tensor | Sequence[float] | None = None, margins: torch.Tensor | Sequence[float] | None = None) -> int:
        """Record one optimizer step (call it right after optimizer.step(), before a scheduler steps): its batch's training
        rows, optionally their losses and margins; returns the step number."""
        self._check_open("step")
        where = f"recorder.step (step {self._steps + 1})"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SettingsError(f"{where}: pass the torch.optim optimizer that just stepped, got {type(optimizer).__name__}")
        rows = self._rows(indices, where)
        values = {name: self._per_example(given, len(rows), name, where) for name, given in (("losses", losses), ("margins", margins))}
        hyperparameters = optimizer_hyperparameters(optimizer)
        self._writer.append(stage=len(self._stages) - 1, indices=rows, **values, **hyperparameters)
        self._stages[-1].add(hyperparameters, len(rows))
        self._steps += 1
        return self._steps

    def stage(self, name: str) -> None:
        """Start a named stage (pretrain, finetune, ...); the previous stage's end is checkpointed, as tdx's trainer always keeps it."""
        self._check_open("stage")
        if not isinstance(name, str) or not name.strip():
            raise SettingsError(f"recorder.stage: a stage needs a non-empty name, got {name!r}")
        if self._stages[-1].steps == 0:  # nothing recorded in the current stage yet: it is this one
            self._stages[-1].name = name
        else:
            self.checkpoint()
            self._stages.append(_StageLog(name))
        self._marker["stage"] = name

    def checkpoint(self, epoch: int | None = None) -> CheckpointInfo:
        """Save the model's weights now (safetensors) as a checkpoint of the current step and stage, and flush the record.

        epoch (shown in the app) defaults to the passes over the training set the stage has drawn so
        far, rounded up. A second checkpoint at the same step returns the first.
        """
        self._check_open("checkpoint")
        if self._steps == 0:
            raise SettingsError("recorder.checkpoint: no optimizer step recorded yet; "
                                "call recorder.step(...) after each optimizer.step() first")
        if self.checkpoints and self.checkpoints[-1].step == self._steps:
            return self.checkpoints[-1]
        stage = self._stages[-1]
        index = len(self.checkpoints)
        path = self.directory / "checkpoints" / f"ckpt_{index:04d}.safetensors"
        self._writer.flush()  # the record reaches at least this checkpoint's step before the checkpoint exists
        save_tensors(path, self.model.state_dict(), metadata={"step": str(self._steps)})
        accuracy = (evaluate_keeping_mode(self.model, self.test_set, self.settings.eval_batch_size)["accuracy"]
                    if self.settings.evaluate_checkpoints else None)
        info = CheckpointInfo(index, self._steps, len(self._stages) - 1,
                              epoch if epoch is not None else max(1, math.ceil(stage.examples / self.n_train)),
                              path.name, accuracy, file_sha256(path), path.stat().st_size)
        self.checkpoints.append(info)
        self._update_marker()
        return info

    def finish(self, *, recipe: Recipe | None = None, trained_by: TrainedBy | None = None) -> Run:
        """Keep the final model as the last checkpoint, evaluate it and write run.json (atomically, last): the run is complete.

        A training function's session passes what made the run: tdx's recipe (else the stages are
        described from the record) and the function tdx can call again (else the run is "recorded").
        """
        self._check_open("finish")
        if self._steps == 0:
            raise SettingsError("recorder: no optimizer step was recorded; "
                                "call recorder.step(optimizer, indices) after each optimizer.step()")
        self.checkpoint()
        self._writer.flush()
        seconds = time.perf_counter() - self._started
        train_metrics = evaluate_keeping_mode(self.model, self.train_set, self.settings.eval_batch_size)
        test_metrics = evaluate_keeping_mode(self.model, self.test_set, self.settings.eval_batch_size)
        metrics = {
            "train_accuracy": train_metrics["accuracy"], "train_loss": train_metrics["loss"],
            "test_accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"],
            "train_seconds": seconds, "n_train": len(self.train_set), "n_test": len(self.test_set),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            **({} if trained_by is not None else {"origin": ORIGIN_RECORDED}),
            **self._flipped_fit(),
        }
        record = TrainingRecord.load(self.directory / RECORD_DIR)
        if record is None or record.n_steps != self._steps:  # flushed above: only a file changed under us gets here
            raise DataError(f"{self.directory / RECORD_DIR}: the record holds {record.n_steps if record else 0} steps, "
                            f"{self._steps} were recorded; another process wrote to this run folder: record the run again")
        recipe = recipe or Recipe(tuple(stage.describe(self.n_train) for stage in self._stages), seed=self.seed,
                                  checkpoints=CheckpointPolicy(every_epochs=None, count=len(self.checkpoints)))
        run = Run(self.run_id, self.workspace, self.data, self.model_spec, recipe, Trajectory.from_record(record),
                  list(self.checkpoints), metrics, created=self.created, record=record, trained_by=trained_by)
        atomic_write_json(self.directory / "run.json", run.to_json())
        (self.directory / INCOMPLETE_MARKER).unlink(missing_ok=True)  # after run.json: a crash in between leaves a complete run
        self._closed = True
        self.run = run
        return run

    @torch.no_grad()
    def _flipped_fit(self) -> dict[str, float]:
        """With labels flipped on purpose (DataSpec.noise_fraction): the fraction of flipped labels the final model predicts."""
        if self.train_set.original_y is None:
            return {}
        flipped = torch.as_tensor(self.train_set.flipped)
        if not flipped.any():
            return {"flipped_fit_fraction": 0.0}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        predictions = self.model(self.train_set.x[flipped].to(device)).argmax(1).cpu()
        self.model.train(was_training)
        return {"flipped_fit_fraction": float((predictions == self.train_set.y[flipped]).float().mean())}

    def abort(self, reason: str) -> None:
        """Stop recording without completing the run: flush what was recorded and mark the run as stopped (it lists as incomplete)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.flush()
        except TdxError as exc:  # e.g. the disk filled: the marker still says why the run stopped
            reason = f"{reason}; the last steps were not written ({exc})"
        self._marker.update(status="stopped", error=reason)
        self._update_marker()

    def _update_marker(self) -> None:
        self._marker.update(steps=self._writer.steps_written, checkpoints=len(self.checkpoints))
        write_marker(self.directory, self._marker)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SettingsError(f"recorder.{what}: run {self.run_id!r} is closed (finished or stopped); "
                                "open a new Recorder to record again")

    def _rows(self, indices: Sequence[int] | np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
        """The batch's training rows as a 1-D int64 CPU tensor, each checked to lie in the training set."""
        rows = indices.detach().cpu() if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        if rows.numel() == 0:
            raise SettingsError(f"{where}: the batch is empty; record steps that trained on at least one example")
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise SettingsError(f"{where}: indices must be integer rows of the training set, got {rows.dtype}")
        rows = rows.reshape(-1).to(torch.int64, copy=True)  # the writer keeps a reference until it flushes: the loop may reuse its buffer
        bad = rows[(rows < 0) | (rows >= self.n_train)]
        if len(bad):
            raise SettingsError(
                f"{where}: index {int(bad[0])} is not a row of the training set (valid: 0..{self.n_train - 1}, "
                f"{self.n_train} examples{f'; {len(bad)} bad indices in this batch' if len(bad) > 1 else ''}); "
                "pass the rows of recorder.train_set the batch was taken from"
            )
        return rows

    @staticmethod
    def _per_example(values: torch.Tensor | Sequence[float] | None, batch: int, name: str, where: str) -> torch.Tensor | None:
        """Per-example losses or margins as a flat tensor of the batch's length (None stays None: recorded as NaN)."""
        if values is None:
            return None
        tensor = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values, dtype=np.float32))
        if tensor.numel() != batch:
            hint = " (the loss with reduction='mean'? use reduction='none' for one loss per example)" if tensor.numel() == 1 else ""
            raise SettingsError(f"{where}: {batch} indices but {tensor.numel()} {name}{hint}; give one value per example of the batch")
        return tensor.reshape(-1).float()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz archive of plain arrays (never pickled objects)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _reloaded(spec: DataSpec, train_set: Dataset, test_set: Dataset) -> tuple[Dataset, Dataset]:
    """The stored data as the run will load it, checked to equal what the loop was handed."""
    stored_train, stored_test = load_dataset(spec)
    for stored, given, split in ((stored_train, train_set, "training"), (stored_test, test_set, "test")):
        if not (torch.equal(stored.x, given.x) and torch.equal(stored.y, given.y)):
            raise DataError(f"{spec.path}: the stored {split} data does not reload as given; "
                            "report this with the arrays' shapes and dtypes")
    return stored_train, stored_test


def list_incomplete(workspace: Workspace | str | Path) -> list[str]:
    """Ids of the runs being recorded or imported, or stopped before completing (a marker, no run.json), sorted."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    if not workspace.runs_dir.is_dir():
        return []
    return sorted(marker.parent.name for marker in workspace.runs_dir.glob(f"*/{INCOMPLETE_MARKER}")
                  if not (marker.parent / "run.json").is_file())


def describe_incomplete(workspace: Workspace | str | Path, run_id: str) -> str:
    """One line saying what an incomplete run holds and what to do (for the app's and the CLI's run lists)."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    directory = workspace.run_dir(run_id, must_exist=False)
    try:
        marker = read_json(directory / INCOMPLETE_MARKER)
    except WorkspaceError:
        marker = {}
    state = "stopped" if marker.get("status") == "stopped" else "still recording, or killed"
    reason = f" ({marker['error']})" if marker.get("error") else ""
    return (f"{run_id}: incomplete {marker.get('origin', 'run')}, {state}{reason} after {marker.get('steps', '?')} steps and "
            f"{marker.get('checkpoints', '?')} checkpoints (since {marker.get('created', '?')}); it cannot be opened: "
            f"record it again with the same id, or delete {directory}")
