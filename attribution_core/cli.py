"""The `tdx` command: train runs, build the demo workspace, attribute, evaluate, open the app."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .errors import SettingsError, TdxError
from .methods.base import ProgressFn
from .store import Workspace

DEFAULT_WORKSPACE = "workspace"


@contextmanager
def tqdm_progress(description: str) -> Iterator[ProgressFn]:
    """A progress callback drawing a tqdm bar on stderr."""
    bar = tqdm(desc=description, unit="step", dynamic_ncols=True, leave=True)
    try:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        yield update
    finally:
        bar.close()


def _parse_classes(text: str) -> tuple[int, ...]:
    """'0-4' or '0,2,5' -> class tuple."""
    classes: list[int] = []
    for part in text.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        classes += range(int(low), int(high or low) + 1)
    return tuple(classes)


def parse_stage(text: str, defaults: dict) -> dict:
    """'name=finetune,epochs=3,lr=0.01,classes=0-4' -> Stage keyword arguments."""
    stage = dict(defaults)
    for item in filter(None, text.split(";" if ";" in text else ",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--stage item {item!r}: expected key=value")
        key = key.strip().replace("-", "_")
        if key == "classes":
            stage[key] = _parse_classes(value.replace("+", ","))
        elif key in ("name", "optimizer", "schedule", "transform"):
            stage[key] = value
        elif key in ("epochs", "batch_size", "warmup_steps", "step_epochs"):
            stage[key] = int(value)
        else:
            stage[key] = float(value)
    return stage


def cmd_train(args: argparse.Namespace) -> None:
    from .data import DataSpec
    from .models import ModelSpec
    from .training import CheckpointPolicy, Recipe, Stage, train

    data = DataSpec(
        source=args.data, path=args.data_path, max_train=args.max_train, max_test=args.max_test,
        noise_fraction=args.noise, noise_seed=args.noise_seed,
    )
    options = {"hidden": [int(width) for width in args.hidden.split(",")]} if args.hidden else {}
    model = ModelSpec(args.model, options)
    defaults = dict(
        epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        batch_size=args.batch_size, optimizer=args.optimizer, schedule=args.schedule, warmup_steps=args.warmup_steps,
    )
    stages = tuple(Stage(**parse_stage(text, defaults)) for text in args.stage) if args.stage else (Stage(**defaults),)
    policy = CheckpointPolicy(every_epochs=None, count=args.checkpoints) if args.checkpoints else CheckpointPolicy(every_epochs=args.checkpoint_every)
    recipe = Recipe(stages, seed=args.seed, checkpoints=policy)
    with tqdm_progress(f"train {args.run_id}") as progress:
        run = train(data, model, recipe, Workspace(args.workspace), args.run_id, device=args.device, progress=progress)
    print(f"run {run.run_id}: test accuracy {run.metrics['test_accuracy']:.3f}, {len(run.checkpoints)} checkpoints")


def cmd_runs(args: argparse.Namespace) -> None:
    from .training import list_runs

    runs = list_runs(Workspace(args.workspace))
    if args.json:
        print(json.dumps([run.to_json() | {"n_steps": run.trajectory.n_steps} for run in runs], indent=1))
        return
    if not runs:
        print(f"no runs in {Path(args.workspace).resolve()} (try `tdx demo`)")
    for run in runs:
        stages = " → ".join(stage.name for stage in run.recipe.stages)
        print(
            f"{run.run_id:24s} {run.model.name:8s} {run.data.source:14s} stages: {stages:20s} "
            f"test acc {run.metrics.get('test_accuracy', float('nan')):.3f}  checkpoints {len(run.checkpoints)}"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import build_demo

    bars: list = []

    def progress_for(run_id: str) -> ProgressFn:
        bar = tqdm(desc=f"demo: {run_id}", unit="step", dynamic_ncols=True)
        bars.append(bar)

        def update(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        return update

    try:
        run_ids = build_demo(Workspace(args.workspace), tiny=args.tiny, progress_for=progress_for)
    finally:
        for bar in bars:
            bar.close()
    print(f"demo workspace {Path(args.workspace).resolve()}: runs {', '.join(run_ids)}")


def cmd_app(args: argparse.Namespace) -> None:
    workspace = Workspace(args.workspace)
    if not workspace.run_ids() and not args.no_demo:
        print(f"building the demo workspace in {workspace.root} (first start, about 2 minutes)…", flush=True)
        cmd_demo(argparse.Namespace(workspace=args.workspace, tiny=False))
    entry = Path(__file__).resolve().parent.parent / "app" / "main.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(entry),
        "--server.address", args.address, "--server.port", str(args.port),
        "--server.headless", "true" if args.headless else "false",
        "--browser.gatherUsageStats", "false",
    ]
    env = os.environ | {"TDX_WORKSPACE": str(workspace.root)}
    print(f"tda-explorer on http://{args.address}:{args.port}  (workspace {workspace.root})", flush=True)
    raise SystemExit(subprocess.call(command, env=env, cwd=entry.parent.parent))


def _add_workspace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=os.environ.get("TDX_WORKSPACE", DEFAULT_WORKSPACE),
                        help="workspace directory (default ./workspace)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every tdx subcommand."""
    parser = argparse.ArgumentParser(prog="tdx", description="tda-explorer: training-data attribution")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a run and record its trajectory")
    _add_workspace(train)
    train.add_argument("run_id", help="name of the new run (letters, digits, . _ -)")
    train.add_argument("--data", default="sample", help="sample, digits, fashion_mnist, npz or image_folder")
    train.add_argument("--data-path", default=None, help="file or folder for fashion_mnist / npz / image_folder")
    train.add_argument("--max-train", type=int, default=None)
    train.add_argument("--max-test", type=int, default=None)
    train.add_argument("--noise", type=float, default=0.0, help="fraction of training labels to flip")
    train.add_argument("--noise-seed", type=int, default=0)
    train.add_argument("--model", default="mlp", help="mlp, cnn, resnet9 or package.module:factory")
    train.add_argument("--hidden", default=None, help="MLP hidden widths, e.g. 128,128")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    train.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine", "linear"])
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--stage", action="append", default=[],
                       help="a training stage as key=value pairs, e.g. 'name=finetune;epochs=3;lr=0.01;classes=0-4' (repeat for more stages)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoints", type=int, default=None, help="keep C evenly spaced checkpoints")
    train.add_argument("--checkpoint-every", type=int, default=1, help="keep one every k epochs")
    train.add_argument("--device", default="cpu")
    train.set_defaults(handler=cmd_train)

    runs = commands.add_parser("runs", help="list the workspace's runs")
    _add_workspace(runs)
    runs.add_argument("--json", action="store_true", help="print every run.json as a JSON list")
    runs.set_defaults(handler=cmd_runs)

    demo = commands.add_parser("demo", help="build the demo workspace on the shipped sample")
    _add_workspace(demo)
    demo.add_argument("--tiny", action="store_true", help="a smaller, faster demo (for tests)")
    demo.set_defaults(handler=cmd_demo)

    app = commands.add_parser("app", help="open the explorer in the browser")
    _add_workspace(app)
    app.add_argument("--port", type=int, default=8501)
    app.add_argument("--address", default="127.0.0.1", help="bind address (default: this machine only)")
    app.add_argument("--headless", action="store_true", help="do not open a browser window")
    app.add_argument("--no-demo", action="store_true", help="do not build the demo workspace when empty")
    app.set_defaults(handler=cmd_app)

    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tdx`."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except TdxError as exc:
        print(f"tdx: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
