"""Import finished checkpoints without a training record: `import_run` and the `tdx import` command.

An imported run is approximate by construction, and says so (metrics["origin"] = "imported"; the
front door adds its no-record note to every score):
- there is no record of the batches: TracIn's and SOURCE's weights assume every stretch of training
  drew every example evenly;
- the trajectory is rebuilt from what is known: each checkpoint's optimizer step (given, or read from
  the file's safetensors metadata "step", which tdx and the Recorder write; else checkpoint c is
  pseudo step c + 1) and each checkpoint's learning rate (given, held constant over the steps since
  the checkpoint before it; else 1 everywhere, i.e. checkpoints weighed equally), SGD without
  momentum, batch size 0 (unknown);
- the recipe is descriptive only (one stage "imported", epochs 1, checkpoint epochs 0 = unknown):
  retraining (LDS ground truth, counterfactual checks) cannot reproduce training it never saw.
The data must be the data the model was trained on, split as in training (same DataSpec fields):
nothing here can check that.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..data import DATA_SOURCES, Dataset, DataSpec, describe_sources, load_dataset
from ..errors import CheckpointError, SettingsError
from ..models import ModelSpec
from ..store import Workspace, atomic_write_bytes, atomic_write_json, file_sha256, load_metadata, load_tensors
from .recorder import (
    INCOMPLETE_MARKER,
    check_architecture,
    clear_stale_run,
    evaluate_keeping_mode,
    factory_name,
    refuse_complete_run,
    utc_now,
    write_marker,
)
from .run import CheckpointInfo, CheckpointPolicy, Recipe, Run, Stage, Trajectory

ORIGIN_IMPORTED = "imported"
"""metrics["origin"] of a run imported from checkpoints (no record, approximate trajectory)."""

EQUAL_LEARNING_RATE = 1.0
"""The learning rate of every step when none is given: checkpoints weigh equally."""


def find_checkpoints(checkpoints: Sequence[str | Path] | str | Path) -> list[Path]:
    """The checkpoint files: a glob pattern's matches in natural name order (ckpt_2 before ckpt_10), or the listed files in their order."""
    if isinstance(checkpoints, (str, Path)) and glob.has_magic(str(checkpoints)):
        pattern = str(Path(checkpoints).expanduser())
        files = sorted((Path(name) for name in glob.glob(pattern)), key=_natural_key)
        if not files:
            folder = Path(pattern).parent
            held = sorted(entry.name for entry in folder.iterdir())[:8] if folder.is_dir() else []
            contents = f"the folder {folder} holds {', '.join(held)}" if held else f"{folder} is empty or missing"
            raise CheckpointError(f"no file matches {pattern!r} ({contents}); give a pattern like 'DIR/*.safetensors'")
        return files
    files = [Path(checkpoints).expanduser()] if isinstance(checkpoints, (str, Path)) else [Path(name).expanduser() for name in checkpoints]
    if not files:
        raise CheckpointError("no checkpoints given; give the files or a pattern like 'DIR/*.safetensors'")
    return files


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _metadata_step(path: Path) -> int | None:
    """The optimizer step stored in a safetensors file's metadata ("step"), or None."""
    value = load_metadata(path).get("step")
    return int(value) if value is not None and value.isdigit() else None


def import_run(
    workspace: Workspace | str | Path,
    run_id: str,
    *,
    model: str,
    checkpoints: Sequence[str | Path] | str | Path,
    data: DataSpec,
    learning_rates: Sequence[float] | None = None,
    options: dict[str, Any] | None = None,
    steps: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Run:
    """Make a run of finished .safetensors checkpoints (copied into the workspace) of a model built by a factory; see the
    module docstring."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    directory = workspace.run_dir(run_id, must_exist=False)
    refuse_complete_run(directory, overwrite, run_id, workspace.root)
    spec = ModelSpec(factory_name(model), dict(options or {}))
    files = find_checkpoints(checkpoints)
    for path in files:  # refuse a .pt (or missing) file before reading any other
        if path.suffix != ".safetensors" or not path.is_file():
            load_tensors(path)  # raises with the store's message (pickle refused: convert with safetensors.torch.save_file)
    files, checkpoint_steps, steps_from = _ordered(files, steps)
    rates, rates_from = _learning_rates(learning_rates, len(files))
    train_set, test_set = load_dataset(data)
    for path in files:  # every checkpoint fits the factory before anything is written
        check_architecture(load_tensors(path), spec, train_set.input_shape, train_set.n_classes, f"checkpoint {path}")
    created = utc_now()
    marker = {"run": run_id, "origin": ORIGIN_IMPORTED, "created": created, "status": "importing", "steps": 0,
              "checkpoints": 0, "stage": "imported", "error": None}
    write_marker(directory, marker)
    clear_stale_run(directory)
    try:
        infos, final = _copy_checkpoints(directory, files, checkpoint_steps, spec, train_set, test_set, marker)
    except BaseException as failure:  # the run stays incomplete and says why
        write_marker(directory, {**marker, "status": "stopped", "error": f"{type(failure).__name__}: {failure}"})
        raise
    train_metrics, test_metrics = evaluate_keeping_mode(final, train_set, 1024), evaluate_keeping_mode(final, test_set, 1024)
    metrics = {
        "train_accuracy": train_metrics["accuracy"], "train_loss": train_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"],
        "n_train": len(train_set), "n_test": len(test_set), "n_parameters": sum(p.numel() for p in final.parameters()),
        "origin": ORIGIN_IMPORTED, "imported_steps": steps_from, "imported_learning_rates": rates_from,
    }
    trajectory = _trajectory(checkpoint_steps, rates)
    recipe = Recipe((Stage(name="imported", epochs=1, lr=max(rates), momentum=0.0, weight_decay=0.0, batch_size=1),),
                    seed=0, checkpoints=CheckpointPolicy(every_epochs=None, count=len(infos)))
    run = Run(run_id, workspace, data, spec, recipe, trajectory, infos, metrics, created=created)
    atomic_write_json(directory / "run.json", run.to_json())
    (directory / INCOMPLETE_MARKER).unlink(missing_ok=True)  # after run.json: a crash in between leaves a complete run
    return run


def _copy_checkpoints(directory: Path, files: list[Path], checkpoint_steps: list[int], spec: ModelSpec, train_set: Dataset,
                      test_set: Dataset, marker: dict[str, Any]) -> tuple[list[CheckpointInfo], nn.Module]:
    """Copy each checkpoint into the run (atomically) and evaluate it; returns their infos and the last checkpoint's model."""
    infos, model = [], None
    for index, (source, step) in enumerate(zip(files, checkpoint_steps)):
        target = directory / "checkpoints" / f"ckpt_{index:04d}.safetensors"
        atomic_write_bytes(target, source.read_bytes())  # a byte copy: the checksum in run.json is the source file's too
        state = load_tensors(target)
        model = check_architecture(state, spec, train_set.input_shape, train_set.n_classes, f"checkpoint {source}")
        model.load_state_dict(state)
        accuracy = evaluate_keeping_mode(model, test_set, 1024)["accuracy"]
        infos.append(CheckpointInfo(index, step, 0, 0, target.name, accuracy, file_sha256(target), target.stat().st_size))
        write_marker(directory, {**marker, "steps": step, "checkpoints": index + 1})
    if model is None:
        raise CheckpointError("no checkpoints to import")  # find_checkpoints never returns none; kept for the type
    return infos, model


def _ordered(files: list[Path], steps: Sequence[int] | None) -> tuple[list[Path], list[int], str]:
    """(files, their optimizer steps, where the steps came from): by the given steps, else the files' metadata, else pseudo steps 1..C."""
    if steps is not None:
        steps, source = [int(step) for step in steps], "given"
        if len(steps) != len(files):
            raise SettingsError(f"{len(steps)} steps given for {len(files)} checkpoints; give one optimizer step per checkpoint")
    else:
        found = [_metadata_step(path) for path in files]
        steps, source = (found, "metadata") if all(step is not None for step in found) else (list(range(1, len(files) + 1)), "pseudo")
    order = sorted(range(len(files)), key=lambda index: steps[index]) if source == "metadata" else list(range(len(files)))
    files, steps = [files[index] for index in order], [steps[index] for index in order]
    if steps[0] < 1 or any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        named = ", ".join(f"{path.name}: {step}" for path, step in zip(files, steps))
        raise SettingsError(f"checkpoint steps must be positive and strictly increasing in checkpoint order ({named})")
    return files, steps, source


def _learning_rates(learning_rates: Sequence[float] | None, count: int) -> tuple[list[float], str]:
    """One learning rate per checkpoint (a single value serves all), and whether they were given."""
    if learning_rates is None:
        return [EQUAL_LEARNING_RATE] * count, "equal (none given)"
    rates = [float(rate) for rate in learning_rates]
    rates = rates * count if len(rates) == 1 else rates
    if len(rates) != count:
        raise SettingsError(f"{len(rates)} learning rates for {count} checkpoints; give one per checkpoint, or one for all")
    if not all(math.isfinite(rate) and rate > 0 for rate in rates):
        raise SettingsError(f"learning rates must be positive numbers, got {rates}")
    return rates, "given"


def _trajectory(checkpoint_steps: list[int], rates: list[float]) -> Trajectory:
    """Per step: checkpoint c's learning rate over the steps since checkpoint c - 1; SGD, no momentum, batch size 0 (unknown)."""
    lengths = np.diff([0, *checkpoint_steps])
    lr = np.repeat(rates, lengths).tolist()
    n_steps = checkpoint_steps[-1]
    return Trajectory(stage=[0] * n_steps, lr=lr, momentum=[0.0] * n_steps, batch_size=[0] * n_steps, optimizer=["sgd"] * n_steps)


def add_import_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tdx import RUN --model package.module:factory --checkpoints 'DIR/*.safetensors' --data SOURCE ...` to tdx's subcommands."""
    what = "make a run of finished .safetensors checkpoints (no training record: approximate)"
    parser = commands.add_parser("import", help=what, description=what)
    parser.add_argument("--workspace", default=os.environ.get("TDX_WORKSPACE", "workspace"),
                        help="workspace directory (default: $TDX_WORKSPACE, else ./workspace)")
    parser.add_argument("run_id", help="name of the new run (letters, digits, . _ -)")
    parser.add_argument("--model", required=True,
                        help="the factory that builds the architecture: package.module:factory (or mlp, cnn, resnet9)")
    parser.add_argument("--options", default="{}", help="the factory's keyword options as JSON, e.g. '{\"hidden\": [128]}'")
    parser.add_argument("--checkpoints", required=True, nargs="+",
                        help="the .safetensors files in training order, or a quoted pattern like 'DIR/*.safetensors'")
    parser.add_argument("--data", required=True, choices=list(DATA_SOURCES),
                        help=f"the data the model was trained on: {describe_sources()}")
    parser.add_argument("--data-path", default=None,
                        help="file or folder for fashion_mnist / npz / image_folder (default: the source's own, if it has one)")
    parser.add_argument("--test-size", type=float, default=0.2, help="test split as in training: a fraction, or a count (>= 1)")
    parser.add_argument("--split-seed", type=int, default=0, help="split seed as in training")
    parser.add_argument("--max-train", type=int, default=None, help="as in training: training examples kept (default: all)")
    parser.add_argument("--max-test", type=int, default=None, help="as in training: test examples kept (default: all)")
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="learning rate at each checkpoint (one for all); default: checkpoints weigh equally")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="optimizer step of each checkpoint; default: the files' 'step' metadata, else 1, 2, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace a run of the same id")
    parser.set_defaults(handler=cmd_import)
    return parser


def cmd_import(args: argparse.Namespace) -> None:
    """Handler of `tdx import`."""
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"--options {args.options!r} is not JSON ({exc}); e.g. --options '{{\"hidden\": [128]}}'") from exc
    if not isinstance(options, dict):
        raise SettingsError(f"--options must be a JSON object of the factory's keyword options, got {args.options!r}")
    test_size = int(args.test_size) if args.test_size >= 1 and float(args.test_size).is_integer() else args.test_size
    data = DataSpec(source=args.data, path=args.data_path, test_size=test_size, split_seed=args.split_seed,
                    max_train=args.max_train, max_test=args.max_test)
    checkpoints = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    run = import_run(args.workspace, args.run_id, model=args.model, options=options, checkpoints=checkpoints, data=data,
                     learning_rates=args.lr, steps=args.steps, overwrite=args.overwrite)
    print(f"imported run {run.run_id}: {len(run.checkpoints)} checkpoints, test accuracy {run.metrics['test_accuracy']:.3f} "
          f"(no training record: scores are approximate); open it with `tdx app --workspace {run.workspace.root}`")
