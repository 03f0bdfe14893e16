"""`tdx clean RUN`: make a cleaning plan from the flags and a ranking's top k, predict its effect, retrain, export the cleaned data.

    tdx clean fmnist-noisy --top 0.1 --method ekfac --retrain --workspace W

prints the plan, the predicted row (test accuracy now and predicted after, predicted flips) and,
with --retrain, the actual rows (the cleaned retrains and the random control, over the seeds) and
how the prediction fared (Spearman of the per-query margin changes, flips predicted and observed).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..annotations import Annotations
from ..errors import SettingsError
from ..evaluation.mislabel import RANKINGS, default_ranking, rank_mislabels
from ..progress import ProgressFn
from ..runs.run import Run, load_run
from ..runs.training import why_not_retrainable
from ..store import Workspace
from .experiment import ExperimentSettings, clean_and_retrain, compare
from .export import FORMATS, export_cleaned
from .plan import CleaningPlan, PlanSource, check_plan, load_source, make_plan, store_plan
from .predict import DEFAULT_METHOD, PredictedEffect, predict_effect, predicting_methods


def add_clean_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tdx clean RUN [--top K] [--ranking NAME] [--method M] [--retrain] [--out PATH]` to tdx's subcommands."""
    parser = commands.add_parser("clean", help="a cleaning plan from the flags (and a ranking's top k): its predicted effect, and "
                                               "with --retrain the run retrained with it beside a random control")
    parser.add_argument("--workspace", default=os.environ.get("TDX_WORKSPACE", "workspace"),
                        help="workspace directory (default ./workspace)")
    parser.add_argument("run_id", help="the run whose flagged labels to fix")
    parser.add_argument("--top", type=float, default=0,
                        help="also the ranking's most suspicious examples: a count, or a fraction of the training set (< 1); default none")
    parser.add_argument("--ranking", default=None, help="the ranking --top takes from (default: the run's default ranking); one of "
                                                        + ", ".join(RANKINGS))
    parser.add_argument("--no-flags", action="store_true", help="leave the run's flags out of the plan (only the ranking's top k)")
    parser.add_argument("--edited", action="store_true", help="the plan as edited in the app (its flags, ranking and edits) instead")
    parser.add_argument("--method", default=DEFAULT_METHOD, help="the method that predicts: one of " + ", ".join(predicting_methods(False))
                        + " (replay: plans without relabels)")
    parser.add_argument("--retrain", action="store_true", help="retrain the run with the plan and with a random control, and keep the "
                                                               "cleaned data as a new run")
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds with --retrain (offsets 0..seeds-1; 0 is the run's own)")
    parser.add_argument("--out", type=Path, default=None, help="also write the cleaned data: a .npz file or an image folder (--format), "
                                                               "with plan.csv beside it (default: write none)")
    parser.add_argument("--format", default="npz", choices=FORMATS, help="the cleaned data's format with --out")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when present)")
    parser.set_defaults(handler=cmd_clean)
    return parser


@contextmanager
def _bar(description: str) -> Iterator[ProgressFn]:
    bar = tqdm(desc=description, unit="step", dynamic_ncols=True)
    try:
        yield lambda done, total: (setattr(bar, "total", total), bar.update(done - bar.n))
    finally:
        bar.close()


def top_count(top: float, n_train: int) -> int:
    """--top as a number of training examples (a fraction below 1 of the training set, else a count)."""
    if top < 0 or (top >= 1 and not float(top).is_integer()):
        raise SettingsError(f"--top {top}: give a count (1, 2, ...) or a fraction of the training set below 1")
    return round(top * n_train) if top < 1 else int(top)


def command_plan(run: Run, args: argparse.Namespace) -> CleaningPlan:
    """The plan the arguments describe, checked to change something."""
    train_set, _ = run.datasets()
    if args.edited:
        source = load_source(run)
    else:
        k = top_count(args.top, len(train_set))
        source = PlanSource(flags=not args.no_flags, ranking=(args.ranking or default_ranking(run)[0]) if k else None, top_k=k)
    ranking = None
    if source.top_k:
        with _bar(f"ranking {source.ranking}") as progress:
            ranking = rank_mislabels(run, source.ranking, progress=progress)
    plan = make_plan(run, source, Annotations(run.workspace.annotations_path).flags(run.run_id), ranking)
    check_plan(run, plan)
    return plan


def predicted_lines(predicted: PredictedEffect) -> list[str]:
    """The predicted row: accuracy now and after, and the flips."""
    before, after = predicted.accuracy()
    return [f"predicted ({predicted.method}): test accuracy {before:.3f} -> {after:.3f} ({after - before:+.3f}); "
            f"{len(predicted.to_right)} test samples predicted to become right, {len(predicted.to_wrong)} wrong; "
            f"mean margin change {predicted.change.mean():+.3f}"]


def cmd_clean(args: argparse.Namespace) -> None:
    """Handler of `tdx clean`."""
    run = load_run(Workspace(args.workspace), args.run_id)
    if args.retrain and (reason := why_not_retrainable(run)) is not None:
        raise SettingsError(reason)
    plan = command_plan(run, args)
    key = store_plan(run, plan)
    print(f"plan {key} ({plan.description}): {plan.summary()}")
    with _bar(f"{args.method} scores of the test set") as progress:
        predicted = predict_effect(run, plan, args.method, device=args.device, progress=progress)
    print("\n".join(predicted_lines(predicted)))
    if args.out is not None:
        written = export_cleaned(run, plan, args.format, args.out)
        print(f"cleaned data: {args.out} ({args.format}), plan beside it ({len(written)} files)")
    if not args.retrain:
        return
    settings = ExperimentSettings(seeds=tuple(range(args.seeds)))
    with _bar(f"retraining {args.run_id} with the plan and a control") as progress:
        actual = clean_and_retrain(run, plan, settings, progress=progress)
    for kind in ("base", "cleaned", "control"):
        accuracy = actual.accuracy(kind)
        print(f"actual {kind:8s}: test accuracy {accuracy.mean():.3f} ± {accuracy.std():.3f} over {len(actual.seeds)} seeds"
              + ("" if kind == "base" else f" (change {np.mean(actual.accuracy_change(kind)):+.3f})"))
    fared = compare(predicted, actual)
    print(f"predicted against actual: Spearman of the per-query margin changes {fared.spearman:.2f}; "
          f"flips predicted {fared.predicted_flips}, observed {fared.observed_flips}, both {fared.flips_both}")
    if actual.cleaned_run:
        print(f"the cleaned data is run {actual.cleaned_run}: open it with `tdx app --workspace {run.workspace.root}`")
