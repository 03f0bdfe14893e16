"""The `tdx` command: train runs, build the demo workspace, attribute, evaluate, open the app.

Each subcommand is declared beside its handler by an `add_<name>_command(commands)` function (the
subparsers action), and COMMANDS lists them in the order `tdx --help` shows them; a command of its
own module (runs/importing.py's add_import_command) is one more entry. Every parser is a TdxParser,
whose help shows each option's default.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cleaning.command import add_clean_command
from .data import Dataset, describe_sources
from .distributed import init_from_torchrun
from .errors import SettingsError, TdxError
from .evaluation.mislabel import RANKINGS
from .exports import FLAG_FORMATS, export_flags, save_scores, score_suffix
from .methods import METHODS
from .progress import ProgressFn
from .runs.importing import add_import_command
from .store import Workspace

DEFAULT_WORKSPACE = "workspace"

Commands = argparse._SubParsersAction
"""What an add_<name>_command function adds its subcommand to."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, unless the help says it in words ("default: ...") or there is none to
    show (a default of None, which the help must then explain; a flag, off unless given; an empty list of repeats)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        nothing_to_show = action.default is None or action.default is False or action.default == []
        if nothing_to_show or "default:" in help_text:
            return help_text
        return super()._get_help_string(action)


class TdxParser(argparse.ArgumentParser):
    """An argument parser with tdx's help format; the parsers of its subcommands are TdxParsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_command(commands: Commands, name: str, what: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line help (in `tdx --help`) is also its description (in `tdx <name> --help`)."""
    return commands.add_parser(name, help=what, description=what)


def add_workspace_option(parser: argparse.ArgumentParser) -> None:
    """--workspace, defaulting to $TDX_WORKSPACE or ./workspace."""
    parser.add_argument("--workspace", default=os.environ.get("TDX_WORKSPACE", DEFAULT_WORKSPACE),
                        help="workspace directory (default: $TDX_WORKSPACE, else ./workspace)")


def method_help() -> str:
    """Every method's name and label, as the help of a --method option lists them ("trak: TRAK; ...")."""
    return "; ".join(f"{name}: {method.label}" for name, method in METHODS.items())


def checkpoints_help(default: str) -> str:
    """The help of a --checkpoints option."""
    return f"checkpoint indices, e.g. 2-5 or 0,3 (negative from the end; default: {default})"


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


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose a run's data (train, record): the source, its path, subsampling and flipped labels."""
    parser.add_argument("--data", default="sample", help=f"the data source: {describe_sources()}")
    parser.add_argument("--data-path", default=None,
                        help="file or folder for fashion_mnist / npz / image_folder (default: the source's own, if it has one)")
    parser.add_argument("--max-train", type=int, default=None, help="keep this many training examples, stratified (default: all)")
    parser.add_argument("--max-test", type=int, default=None, help="keep this many test examples, stratified (default: all)")
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of training labels to flip")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the flipped labels")


def _data_spec(args: argparse.Namespace):
    from .data import DataSpec

    return DataSpec(source=args.data, path=args.data_path, max_train=args.max_train, max_test=args.max_test,
                    noise_fraction=args.noise, noise_seed=args.noise_seed)


def cmd_train(args: argparse.Namespace) -> None:
    from .models import ModelSpec
    from .runs.run import CheckpointPolicy, Recipe, Stage
    from .runs.training import train

    data = _data_spec(args)
    options = {"hidden": [int(width) for width in args.hidden.split(",")]} if args.hidden else {}
    model = ModelSpec(args.model, options)
    defaults = dict(
        epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        batch_size=args.batch_size, optimizer=args.optimizer, schedule=args.schedule, warmup_steps=args.warmup_steps,
    )
    stages = tuple(Stage(**parse_stage(text, defaults)) for text in args.stage) if args.stage else (Stage(**defaults),)
    policy = (CheckpointPolicy(every_epochs=None, count=args.checkpoints) if args.checkpoints
              else CheckpointPolicy(every_epochs=args.checkpoint_every))
    recipe = Recipe(stages, seed=args.seed, checkpoints=policy)
    workspace = Workspace(args.workspace)
    workspace.run_dir(args.run_id, must_exist=False)  # refuse a bad run id before drawing the progress bar
    with tqdm_progress(f"train {args.run_id}") as progress:
        run = train(data, model, recipe, workspace, args.run_id, device=args.device, progress=progress)
    print(f"run {run.run_id}: test accuracy {run.metrics['test_accuracy']:.3f}, {len(run.checkpoints)} checkpoints")
    _queue_ready(workspace, [run], with_groundtruth=False)


def add_train_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx train RUN --data ... --model ... [--stage ...]`."""
    train = add_command(commands, "train", "train a run and record its trajectory")
    add_workspace_option(train)
    train.add_argument("run_id", help="name of the new run (letters, digits, . _ -)")
    add_data_options(train)
    train.add_argument("--model", default="mlp", help="mlp, cnn, resnet9 or package.module:factory")
    train.add_argument("--hidden", default=None, help="MLP hidden widths, e.g. 128,128 (default: the model's)")
    train.add_argument("--epochs", type=int, default=10, help="passes over the data (each stage's, without --stage)")
    train.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Adam: beta1)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay")
    train.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="the optimizer")
    train.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine", "linear"],
                       help="learning-rate schedule")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up from 0 over this many steps")
    train.add_argument("--stage", action="append", default=[],
                       help="a training stage as key=value pairs, e.g. 'name=finetune;epochs=3;lr=0.01;classes=0-4' (repeat for "
                            "more stages; keys not given take the options above; default: one stage of the options above)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    train.add_argument("--checkpoints", type=int, default=None, help="keep C evenly spaced checkpoints (default: --checkpoint-every)")
    train.add_argument("--checkpoint-every", type=int, default=1, help="keep one every k epochs")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (CUDA when present)")
    train.set_defaults(handler=cmd_train)
    return train


def _queue_ready(workspace: Workspace, runs: list, *, with_groundtruth: bool) -> None:
    """Queue what the app's first pages will show of these runs (the app's workers compute it); say so in one line."""
    from .jobs.ready import queue_ready_jobs

    queued = queue_ready_jobs(workspace, runs, with_groundtruth=with_groundtruth)
    if queued:
        print(f"queued {len(queued)} jobs for the app's first pages (its workers run them; `tdx jobs` lists them, "
              "`tdx jobs run` runs them here)")


def cmd_record(args: argparse.Namespace) -> None:
    from .models import ModelSpec
    from .runs.training import record_run

    workspace = Workspace(args.workspace)
    workspace.run_dir(args.run_id, must_exist=False)  # refuse a bad run id before importing or training anything
    model = ModelSpec(args.model, _settings_overrides(args.model_option))
    with tqdm_progress(f"record {args.run_id}") as progress:
        run = record_run(workspace, args.run_id, args.function, data=_data_spec(args), model=model, options=_settings_overrides(args.set),
                         seed=args.seed, device=args.device, progress=progress)
    print(f"run {run.run_id}: test accuracy {run.metrics['test_accuracy']:.3f}, {len(run.checkpoints)} checkpoints; trained by "
          f"{run.trained_by.function}, which tdx calls again to retrain and replay it")
    _queue_ready(workspace, [run], with_groundtruth=False)


def add_record_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx record package.module:function RUN --model ... --data ... [--set key=value]`."""
    record = add_command(commands, "record", "train a run by your own training function, which tdx then calls again to retrain and "
                                             "replay it (README: Your own model)")
    add_workspace_option(record)
    record.add_argument("function", help="the training function, package.module:function, called as function(session)")
    record.add_argument("run_id", help="name of the new run (letters, digits, . _ -)")
    record.add_argument("--model", required=True, help="the factory that builds the architecture: package.module:factory (or mlp, cnn, "
                                                       "resnet9), called as factory(input_shape, n_classes, **options)")
    record.add_argument("--model-option", action="append", default=[],
                        help="a factory option as name=value, e.g. --model-option hidden=64 (repeat for more; default: none)")
    add_data_options(record)
    record.add_argument("--set", action="append", default=[],
                        help="an option the function reads from session.options, e.g. --set epochs=6 (repeat for more; default: none)")
    record.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order, augmentation and dropout")
    record.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (CUDA when present)")
    record.set_defaults(handler=cmd_record)
    return record


def cmd_trust(args: argparse.Namespace) -> None:
    from .runs.run import load_run
    from .trust import config_dir, trust, untrusted

    run = load_run(Workspace(args.workspace), args.run_id)
    needed = untrusted(run.code(), run.workspace.root)
    if not needed:
        print(f"run {run.run_id} imports nothing that needs consent ({', '.join(run.code()) or 'no code of its own'})")
        return
    for module, location in needed:
        print(f"{module}: {location}")
    trust([module for module, _ in needed], run.workspace.root)
    print(f"trusted for workspace {run.workspace.root}: {', '.join(module for module, _ in needed)} (consent kept in {config_dir()})")


def add_trust_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx trust RUN`: consent to import the code a run names, for its workspace."""
    trust = add_command(commands, "trust", "agree to import the code a run names (its model factory and training function) for "
                                           "this workspace; prints each module's file first")
    add_workspace_option(trust)
    trust.add_argument("run_id", help="the run whose code to trust")
    trust.set_defaults(handler=cmd_trust)
    return trust


RUNS_COLUMNS = ("run", "model", "data", "stages", "test acc", "checkpoints")
"""The columns `tdx runs` lists, named in its header line."""


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Lines of a plain-text table: the header, then the rows, each column as wide as its widest cell (the last unpadded)."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]


def cmd_runs(args: argparse.Namespace) -> None:
    from .runs.recorder import describe_incomplete, list_incomplete
    from .runs.run import list_runs

    runs = list_runs(Workspace(args.workspace))
    if args.json:
        print(json.dumps([run.to_json() | {"n_steps": run.trajectory.n_steps} for run in runs], indent=1))
        return
    if not runs:
        print(f"no runs in {Path(args.workspace).resolve()} (try `tdx demo`)")
    else:
        rows = [(run.run_id, run.model.name, run.data.source, " → ".join(stage.name for stage in run.recipe.stages),
                 f"{run.metrics.get('test_accuracy', float('nan')):.3f}", str(len(run.checkpoints))) for run in runs]
        print("\n".join(table(RUNS_COLUMNS, rows)))
    for run_id in list_incomplete(args.workspace):
        print("incomplete: " + describe_incomplete(args.workspace, run_id))


def add_runs_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx runs [--json]`."""
    runs = add_command(commands, "runs", "list the workspace's runs (and the incomplete ones a recorded loop left)")
    add_workspace_option(runs)
    runs.add_argument("--json", action="store_true", help="print every run.json as a JSON list instead of a table")
    runs.set_defaults(handler=cmd_runs)
    return runs


def cmd_demo(args: argparse.Namespace) -> None:
    from .runs.demo import FULL_RUN_ID, build_demo
    from .runs.run import load_run

    bars: list = []

    def progress_for(run_id: str) -> ProgressFn:
        bar = tqdm(desc=f"demo: {run_id}", unit="step", dynamic_ncols=True)
        bars.append(bar)

        def update(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        return update

    workspace = Workspace(args.workspace)
    try:
        run_ids = build_demo(workspace, tiny=args.tiny, full=args.full, progress_for=progress_for)
    finally:
        for bar in bars:
            bar.close()
    print(f"demo workspace {workspace.root}: runs {', '.join(run_ids)}")
    runs = [load_run(workspace, run_id) for run_id in run_ids]
    # An LDS ground truth of the sample's runs is minutes; of the 60,000-image run it would be an hour: asked for on its page only.
    _queue_ready(workspace, [run for run in runs if run.run_id != FULL_RUN_ID], with_groundtruth=True)
    _queue_ready(workspace, [run for run in runs if run.run_id == FULL_RUN_ID], with_groundtruth=False)


def add_demo_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx demo [--tiny] [--full]`."""
    demo = add_command(commands, "demo", "build the demo workspace on the shipped sample")
    add_workspace_option(demo)
    demo.add_argument("--tiny", action="store_true", help="a smaller, faster demo (for tests)")
    demo.add_argument("--full", action="store_true",
                      help="also train a CNN on all 60,000 Fashion-MNIST images (Debian's dataset-fashion-mnist; a few minutes)")
    demo.set_defaults(handler=cmd_demo)
    return demo


APP_ENTRY = Path(__file__).resolve().parent.parent / "app" / "main.py"
HEALTH_WAIT_SECONDS = 120


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The argv that starts the app's Streamlit server: always headless, so Streamlit never prompts."""
    return [
        sys.executable, "-m", "app.serve", "run", str(APP_ENTRY),  # Streamlit's command line, imports warmed (app/serve.py)
        "--server.address", args.address, "--server.port", str(args.port),
        # Headless false makes Streamlit ask for an email on first run: it blocks a terminal and
        # exits 255 without one. The browser is opened by `--open` instead (_open_when_ready).
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]


def _open_when_ready(url: str) -> None:
    """Open `url` in a browser once the server's health endpoint answers (runs in a background thread)."""
    deadline = time.monotonic() + HEALTH_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:  # noqa: S310 (our own http URL)
                if response.status == 200:
                    if not webbrowser.open(url):
                        print(f"tdx: no browser found; open {url} yourself", file=sys.stderr, flush=True)
                    return
        except OSError:
            time.sleep(0.25)
    print(f"tdx: the app did not answer within {HEALTH_WAIT_SECONDS} s; no browser opened", file=sys.stderr, flush=True)


def cmd_app(args: argparse.Namespace) -> None:
    workspace = Workspace(args.workspace)
    if not workspace.run_ids() and not args.no_demo:
        print(f"building the demo workspace in {workspace.root} (first start, a few seconds)…", flush=True)
        cmd_demo(argparse.Namespace(workspace=args.workspace, tiny=False, full=False))
    # The server runs from the app's folder; the folder tdx was started from stays importable there (a run's factory or
    # training function in the user's project), ahead of installed packages as on this command line (main).
    python_path = os.pathsep.join(filter(None, (os.getcwd(), os.environ.get("PYTHONPATH"))))
    env = os.environ | {"TDX_WORKSPACE": str(workspace.root), "PYTHONPATH": python_path}
    url = f"http://{args.address}:{args.port}"
    print(f"tda-explorer on {url}  (workspace {workspace.root})", flush=True)
    if args.open:
        # A wildcard bind address is not one a browser can visit; this machine's loopback is.
        host = "127.0.0.1" if args.address in ("0.0.0.0", "::", "") else args.address  # noqa: S104 (a comparison)
        threading.Thread(target=_open_when_ready, args=(f"http://{host}:{args.port}",), daemon=True).start()
    # The workers start now, not at the first page view: the queued jobs run before anyone opens the app.
    from .jobs.worker import ensure_workers

    ensure_workers(workspace.root)
    # stdin from /dev/null: nothing Streamlit starts can wait on a terminal (or fail for lack of one).
    server = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
        streamlit_command(args), env=env, cwd=APP_ENTRY.parent.parent, stdin=subprocess.DEVNULL
    )
    # A TERM sent to `tdx app` (a service manager, kill) stops the server too, not only this process.
    signal.signal(signal.SIGTERM, lambda signum, frame: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server as well (same process group): let it finish stopping
        code = server.wait()
    raise SystemExit(code)


def add_app_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx app [--port N] [--open]`."""
    app = add_command(commands, "app", "serve the explorer (never prompts; --open for a browser window)")
    add_workspace_option(app)
    app.add_argument("--port", type=int, default=8501, help="port to serve on")
    app.add_argument("--address", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    app.add_argument("--open", action="store_true", help="open the app in a browser once it answers")
    app.add_argument("--headless", action="store_true",
                     help="deprecated, no effect: headless is the default now (--open asks for a browser)")
    app.add_argument("--no-demo", action="store_true", help="do not build the demo workspace when empty")
    app.set_defaults(handler=cmd_app)
    return app


def cmd_jobs(args: argparse.Namespace) -> None:
    from .jobs.queue import JobQueue
    from .jobs.worker import LANES, work

    queue = JobQueue(Workspace(args.workspace).root)
    if args.jobs_command == "run":
        queue.requeue_stale()
        count = work(args.workspace, "background", idle_exit=None, until_empty=True)
        print(f"ran {count} jobs" if count or not queue.jobs(states=("queued",)) else
              f"another worker serves {args.workspace}: its jobs run there (lanes: {', '.join(LANES)})")
    elif args.jobs_command == "cancel":
        if not args.key or queue.get(args.key) is None:
            raise SettingsError(f"no job {args.key!r}; `tdx jobs` lists them")
        queue.cancel(args.key)
        print(f"cancel requested for job {args.key}")
    else:
        rows = queue.jobs(states=None if args.all else ("queued", "running", "failed"))
        for job in rows:
            progress = f"{job.done}/{job.total}" if job.total else ""
            print(f"{job.key}  {job.state:9s} {progress:>9s}  {job.spec.run_id:20s} {job.spec.title}"
                  + (f"  ({job.error})" if job.error else ""))
        if not rows:
            print("no jobs waiting, running or failed" + ("" if args.all else " (--all lists finished ones too)"))


def add_jobs_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx jobs [list|run|cancel KEY] [--all]`."""
    jobs = add_command(commands, "jobs", "the workspace's background jobs (fits, scores, ground truths, maps): list, run, cancel")
    add_workspace_option(jobs)
    jobs.add_argument("jobs_command", nargs="?", default="list", choices=("list", "run", "cancel"),
                      help="list the queued, running and failed jobs; run the queued ones here until none is left; or "
                           "cancel one")
    jobs.add_argument("key", nargs="?", help="the job to cancel, by the key `tdx jobs` lists")
    jobs.add_argument("--all", action="store_true", help="list finished jobs too")
    jobs.set_defaults(handler=cmd_jobs)
    return jobs


def _load_run(args: argparse.Namespace):
    from .runs.run import load_run

    return load_run(Workspace(args.workspace), args.run_id)


def _settings_overrides(pairs: list[str]) -> dict:
    """'k=512' 'projection=dense' -> {'k': 512, 'projection': 'dense'} (values parsed as JSON when possible)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SettingsError(f"--set {pair!r}: expected name=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _checkpoint_list(text: str | None) -> list[int] | None:
    return None if text is None else list(_parse_classes(text))


def example_name(dataset: Dataset, index: int) -> str:
    """'#index' as the app names a training example, with its dataset id beside it where the two differ ('#609 (id 11140)')."""
    example_id = int(dataset.ids[index])
    return f"#{int(index)}" + (f" (id {example_id})" if example_id != int(index) else "")


def cmd_attribute(args: argparse.Namespace) -> None:
    from .api import attribute
    from .jobs.ready import default_method

    run = _load_run(args)
    if args.out:
        score_suffix(args.out)  # a bad --out fails now, not after the scoring
    queries = list(_parse_classes(args.queries)) if args.queries else None
    method = args.method or default_method(run)
    with tqdm_progress(f"{method} on {args.run_id}") as progress:
        scores = attribute(run, method, queries=queries, checkpoints=_checkpoint_list(args.checkpoints),
                           settings=_settings_overrides(args.set), progress=progress, device=args.device)
    train_set, _ = run.datasets()
    for note in scores.notes:
        print(f"note: {note}")
    print(f"{scores.method}: {scores.n_queries} queries x {scores.values.shape[1]} training examples "
          f"in {scores.seconds:.2f} s (checkpoints {scores.checkpoints}); stored under key {scores.key}")
    for query in range(min(scores.n_queries, args.show)):
        for kind, (indices, values) in (("proponents", scores.top_proponents(query, args.top)),
                                        ("opponents", scores.top_opponents(query, args.top))):
            listed = ", ".join(f"{example_name(train_set, i)} {train_set.class_names[int(train_set.y[i])]} ({v:+.3g})"
                               for i, v in zip(indices, values))
            print(f"{scores.query_names[query]} {kind}: {listed}")
    if args.out:
        written = save_scores(args.out, scores, train_set, top=args.out_top)
        print(f"wrote {', '.join(str(path) for path in written)}")


DEFAULT_METHOD_HELP = "default: the run's own, as in the app: the first method that can attribute the run, TRAK for most runs"
"""What a --method option without a value means."""


def add_attribute_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx attribute RUN [--method M] [--queries 0-9] [--out scores.npy]`."""
    attribute = add_command(commands, "attribute", "score test examples against the training set")
    add_workspace_option(attribute)
    attribute.add_argument("run_id", help="the run to attribute")
    attribute.add_argument("--method", default=None, help=f"the method ({DEFAULT_METHOD_HELP}); one of {method_help()}")
    attribute.add_argument("--queries", default=None,
                           help="test indices, e.g. 0-9 or 3,7 (default: the whole test set, one row of scores per test sample, "
                                "all stored; EK-FAC and SOURCE without --set k stream the training set once per block of "
                                "queries: minutes on a CPU for thousands of queries)")
    attribute.add_argument("--checkpoints", default=None, help=checkpoints_help("the method's"))
    attribute.add_argument("--set", action="append", default=[],
                           help="a method setting as name=value, e.g. --set k=512 (repeat for more; default: the method's)")
    attribute.add_argument("--top", type=int, default=5, help="proponents/opponents to print per query")
    attribute.add_argument("--show", type=int, default=3, help="queries to print")
    attribute.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when present)")
    attribute.add_argument("--out", type=Path, default=None,
                           help="also write the scores: .npy (matrix + .json ids), .parquet (long table) or .csv (top k per "
                                "query) (default: write none)")
    attribute.add_argument("--out-top", type=int, default=10, help="proponents/opponents per query in an --out .csv")
    attribute.set_defaults(handler=cmd_attribute)
    return attribute


def cmd_flags_export(args: argparse.Namespace) -> None:
    from .annotations import Annotations

    run = _load_run(args)
    annotations = Annotations(Workspace(args.workspace).annotations_path)
    written = export_flags(run, annotations, args.format, args.out)
    print(f"wrote {', '.join(str(path) for path in written)}: {args.format} export of the "
          f"{len(annotations.flags(run.run_id))} verdicts on {run.run_id}")


def add_flags_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx flags export RUN --format csv|cleanlab|fiftyone --out PATH`."""
    flags = add_command(commands, "flags", "the flags users set on training examples")
    flag_commands = flags.add_subparsers(dest="flags_command", required=True)
    flags_export = add_command(flag_commands, "export", "write a run's flags for other tools")
    add_workspace_option(flags_export)
    flags_export.add_argument("run_id", help="the run whose flags to write")
    flags_export.add_argument("--format", required=True, choices=FLAG_FORMATS,
                              help="csv (the flags table), cleanlab (label-issues mask .npy of 'mislabeled' flags) "
                                   "or fiftyone (a FiftyOneDataset directory, one tag per flag)")
    flags_export.add_argument("--out", type=Path, required=True, help="file (csv, cleanlab) or directory (fiftyone) to write")
    flags_export.set_defaults(handler=cmd_flags_export)
    return flags


def cmd_lds(args: argparse.Namespace) -> None:
    from .api import attribute
    from .evaluation.lds import LdsSettings, groundtruth, lds

    run = _load_run(args)
    alpha = args.alpha if args.alpha is not None else (0.95 if args.mode == "order_keeping" else 0.5)
    settings = LdsSettings(n_subsets=args.subsets, alpha=alpha, seed=args.seed, seeds_per_subset=args.seeds_per_subset, mode=args.mode)
    with tqdm_progress(f"ground truth {args.run_id}") as progress:
        truth = groundtruth(run, settings, progress=progress, workers=args.workers)
    for method in args.methods.split(","):
        with tqdm_progress(method) as progress:
            result = lds(attribute(run, method, progress=progress, checkpoints=_checkpoint_list(args.checkpoints)), truth)
        print(f"{method:10s} LDS {result.mean:.3f} ± {result.stderr:.3f}")


def add_lds_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx lds RUN [--methods trak,ekfac] [--subsets N] [--mode reshuffled|order_keeping]`."""
    lds_parser = add_command(commands, "lds", "LDS ground truth by retraining on random subsets, then each method's LDS")
    add_workspace_option(lds_parser)
    lds_parser.add_argument("run_id", help="the run to evaluate")
    lds_parser.add_argument("--methods", default="trak,ekfac,tracin", help=f"comma-separated, each one of {method_help()}")
    lds_parser.add_argument("--subsets", type=int, default=100, help="random subsets retrained (or replayed)")
    lds_parser.add_argument("--alpha", type=float, default=None,
                            help="fraction kept per subset (default: 0.5; 0.95 with --mode order_keeping)")
    lds_parser.add_argument("--mode", default="reshuffled", choices=("reshuffled", "order_keeping"),
                            help="reshuffled: retrain each subset from scratch; order_keeping: replay the recorded batch order "
                                 "with the removed examples weighted 0 (the question replay answers)")
    lds_parser.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    lds_parser.add_argument("--seeds-per-subset", type=int, default=1, help="retraining seeds averaged per subset")
    lds_parser.add_argument("--workers", type=int, default=1, help="retraining processes")
    lds_parser.add_argument("--checkpoints", default=None, help=checkpoints_help("each method's"))
    lds_parser.set_defaults(handler=cmd_lds)
    return lds_parser


def cmd_counterfactual(args: argparse.Namespace) -> None:
    from .evaluation.counterfactual import CounterfactualSettings, counterfactual
    from .jobs.ready import default_method

    run = _load_run(args)
    settings = CounterfactualSettings(k=args.k, n_random=args.random, seeds=tuple(range(args.seeds)))
    with tqdm_progress(f"counterfactual {args.run_id} query {args.query}") as progress:
        result = counterfactual(run, args.query, args.method or default_method(run), settings=settings, progress=progress,
                                checkpoints=_checkpoint_list(args.checkpoints))
    print(f"query test {args.query}: margin {np.mean(result.base_margins):+.3f} with all training data")
    for kind in result.margins:
        print(f"  without {result.k} {kind:12s}: margin {np.mean(result.margins[kind]):+.3f} "
              f"(change {result.margin_change(kind):+.3f}), predicted {result.predictions[kind]}")


def add_counterfactual_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx counterfactual RUN QUERY [--method M] [--k 0.05]`."""
    counterfactual = add_command(commands, "counterfactual", "remove a query's top proponents, retrain, compare")
    add_workspace_option(counterfactual)
    counterfactual.add_argument("run_id", help="the run to retrain")
    counterfactual.add_argument("query", type=int, help="test-set index")
    counterfactual.add_argument("--method", default=None, help=f"the method that chooses the proponents ({DEFAULT_METHOD_HELP}); "
                                                                f"one of {method_help()}")
    counterfactual.add_argument("--k", type=float, default=0.05, help="fraction (<1) or count of examples to remove")
    counterfactual.add_argument("--random", type=int, default=3, help="random-removal draws")
    counterfactual.add_argument("--seeds", type=int, default=1, help="retraining seeds per removal")
    counterfactual.add_argument("--checkpoints", default=None, help=checkpoints_help("the method's"))
    counterfactual.set_defaults(handler=cmd_counterfactual)
    return counterfactual


def cmd_mislabels(args: argparse.Namespace) -> None:
    from .evaluation.mislabel import default_ranking, mislabel_metrics, rank_mislabels

    run = _load_run(args)
    train_set, _ = run.datasets()
    name, fallback_reason = (args.ranking, None) if args.ranking else default_ranking(run)
    if fallback_reason is not None:
        print(f"note: {fallback_reason}")
    with tqdm_progress(f"{name} on {args.run_id}") as progress:
        ranking = rank_mislabels(run, name, checkpoints=_checkpoint_list(args.checkpoints), progress=progress)
    for index in ranking.order()[: args.top]:
        suggestion = ranking.suggestion(index, int(train_set.y[index]))
        suggested = "" if suggestion is None else f" → {train_set.class_names[suggestion]}"
        print(f"{example_name(train_set, index)} {train_set.class_names[int(train_set.y[index])]}{suggested} ({ranking.scores[index]:.3g})")
    if train_set.flipped.any():
        metrics = mislabel_metrics(ranking.scores, train_set.flipped)
        print(f"injected noise found: top 10 % {metrics['top10']:.2f}, top 20 % {metrics['top20']:.2f}, ROC-AUC {metrics['auc']:.3f}")


def add_mislabels_command(commands: Commands) -> argparse.ArgumentParser:
    """`tdx mislabels RUN [--ranking R] [--top 20]`."""
    mislabels = add_command(commands, "mislabels", "rank training examples by how likely their label is wrong")
    add_workspace_option(mislabels)
    mislabels.add_argument("run_id", help="the run whose training set to rank")
    mislabels.add_argument("--ranking", default=None,
                           help="the ranking (default: the run's own, which the app opens with too: dynamics for a run with a "
                                "training record, else loss_avg); one of " + ", ".join(RANKINGS))
    mislabels.add_argument("--checkpoints", default=None, help=checkpoints_help("the ranking's"))
    mislabels.add_argument("--top", type=int, default=20, help="suspects to print")
    mislabels.set_defaults(handler=cmd_mislabels)
    return mislabels


COMMANDS: list[Callable[[Commands], argparse.ArgumentParser]] = [
    add_train_command, add_record_command, add_trust_command, add_runs_command, add_demo_command, add_app_command, add_attribute_command,
    add_flags_command,
    add_lds_command, add_counterfactual_command, add_mislabels_command, add_clean_command, add_jobs_command, add_import_command,
]
"""Every subcommand's adder, in the order `tdx --help` lists them: a new command is its handler, its add_<name>_command
beside it (in this module or its own) and one entry here."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every tdx subcommand."""
    parser = TdxParser(prog="tdx", description="tda-explorer: training-data attribution")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tdx`."""
    if os.getcwd() not in sys.path:
        # First, as `python -m` puts it (the app server and the job workers run that way): a run's factory or training
        # function in the project tdx is run from ("examples.own_training_loop:train" from this repository's root) imports
        # here as it does there, even where an installed package takes the same top-level name (kronfluence installs one
        # called `examples`).
        sys.path.insert(0, os.getcwd())
    args = build_parser().parse_args(argv)
    init_from_torchrun()  # under torchrun, train-side passes and retrains are shared by the ranks
    try:
        args.handler(args)
    except TdxError as exc:
        print(f"tdx: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
