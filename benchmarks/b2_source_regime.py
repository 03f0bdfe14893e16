"""B2: SOURCE's regime on Fashion-MNIST, a not-converged run and a two-stage run, LDS side by side.

The settings train the MLP 784-128-10 on the shipped Fashion-MNIST sample (2,000 training and
200 test images; --quick: 1,000 and 100) with SGD (momentum 0.9, batch 64) and keep six
checkpoints, so SOURCE's L = 1, 2, 3 segments divide them:
- not_converged: two epochs at lr 0.01, checkpoints evenly spaced over the steps; the test
  accuracy (about 0.6) is far below a converged run's (0.83 for the demo's fmnist-mlp);
- two_stage: three epochs of pretraining on all ten classes with Gaussian pixel noise (lr 0.05),
  then three epochs of fine-tuning on clean images of classes 0-4 only (lr 0.01), a checkpoint
  after every epoch: three per stage. A stage-1 example reaches a query only through stage 2.
- rotated: three epochs on all classes (lr 0.05), then three epochs on the same images rotated by
  90 degrees (lr 0.01): stage 2 trains on inputs the checkpoints of stage 1 never saw. The queries
  are the upright test images, which the final model has mostly unlearnt (accuracy about 0.15).
- rotated_stage2_queries: the same run, its queries the test images as stage 2 sees them (rotated;
  a Task whose measurement rotates its input, so methods and ground truth measure the same margin).
  Its row source_l2_by_hand is the same run with the rotation moved inside the model by hand: a
  plain loop (the Recorder) replays the run's recorded batches, learning rates and momentum with a
  model that rotates its own inputs from stage 2 on and no stage transform; its final weights are
  checked equal to the run's (so the run's ground truth is its own) and SOURCE (L = 2) scores it.
  SOURCE takes the query's gradient at the final model, which rotates it in both, so the two rows
  should agree to rounding (tests/test_stage_views.py checks the scores on a small run).
Every method takes each checkpoint's gradients on its stage's view of the training images
(noise, rotation) and SOURCE and TracIn weigh each example by how often that stretch of training
drew it (the run's record; 0 for classes a stage leaves out). The row source_l2_no_views scores
SOURCE (L = 2) the way the project did before it read the record: every checkpoint on the plain
training images, every example in every segment.
Ground truth: the whole pipeline (both stages) retrained on M random halves of the training set
(M = 100; --quick: 20), one seed each, the test margins recorded (evaluation/lds.py). Every
method scores all test images against the same six checkpoints (EK-FAC influence: the last one,
where it is defined); seconds include its train-side work. SOURCE segments never cross a stage
boundary, so L = 1 does not exist for the two-stage run.

--smoke: 256 training and 32 test images, a narrow MLP (common.smoke_model), 4 subsets, --sensitivity included.

--sensitivity adds, per setting, what moves the comparison: EK-FAC influence at other dampings,
SOURCE (L = 2) with η̄K scaled, and each of its two segments' contributions alone.

    python benchmarks/b2_source_regime.py [--quick | --smoke] [--sensitivity] [--json PATH] [--workspace DIR] [--workers N]
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from common import add_workers_option, by_mode, markdown_table, parser, report, shrunk, timed, workers, workspace_root

from attribution_core.api import attribute, default_checkpoints, prepare
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError
from attribution_core.evaluation.lds import GroundTruth, LdsSettings, groundtruth, lds
from attribution_core.models import ModelSpec, build_model
from attribution_core.numerics.inputs import Segment
from attribution_core.runs.recorder import Recorder, RecorderSettings
from attribution_core.runs.replay_engine import relative_difference, replay_plan
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.scores import Scores
from attribution_core.store import Workspace
from attribution_core.task import Task, correct_class_margin

N_CHECKPOINTS = 6
DAMPING_RATIOS = (0.1, 10.0, 100.0, 1000.0)
"""EK-FAC influence's damping as a fraction of each layer's mean eigenvalue (default 1; 0.1 is kronfluence's heuristic),
for --sensitivity."""
LR_SUM_FACTORS = (0.1, 10.0)
"""Factors on every segment's η̄K for --sensitivity."""
MODEL = ModelSpec("mlp", {"hidden": [128]})
BY_HAND_FACTORY = "b2_source_regime:rotating_mlp"
"""The by-hand model's factory, found again when its run is opened (benchmarks/ is on sys.path when B2 runs)."""
SAME_WEIGHTS_TOLERANCE = 1e-4
"""Largest relative difference allowed between the by-hand run's final weights and the run's own."""
JSON_KEYS = ("settings",)


ROTATION = Stage(name="rotated", transform="rotate")
"""The rotate stage transform, whose view B2's by-hand model and stage-2 queries apply."""


def rotated(x: torch.Tensor) -> torch.Tensor:
    """Images rotated as the rotate stage transform rotates them (run.Stage.view; it draws nothing from the seed)."""
    return ROTATION.view(x, seed=0)


class StageTwoQueries(Task):
    """The correct-class margin of the query as stage 2 sees it: rotated by 90 degrees."""

    def measurement(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Margin of the rotated image."""
        return correct_class_margin(model(rotated(x)), y)


class RotatingInputs(torch.nn.Module):
    """A network that rotates its inputs by 90 degrees while its `rotating` buffer is 1: a rotate stage moved inside the model."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.register_buffer("rotating", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.where, not an if on the buffer: per-example gradients run the model under torch.func.vmap
        return self.network(torch.where(self.rotating.bool(), rotated(x), x))


def rotating_mlp(input_shape: tuple[int, ...], n_classes: int, **options: Any) -> torch.nn.Module:
    """The project's MLP (options: its sizes) inside RotatingInputs (a model factory)."""
    return RotatingInputs(build_model(ModelSpec("mlp", options), input_shape, n_classes))


@dataclass(frozen=True)
class Setting:
    """One run of B2: its data, model, recipe and what it shows."""

    data: DataSpec
    model: ModelSpec
    recipe: Recipe
    description: str
    task: Task = field(default_factory=Task)
    run_of: str | None = None
    """The setting whose run this one reuses (the same training, other queries); None: its own run."""
    by_hand: bool = False
    """Also score the run with its rotate stage moved inside the model by hand (source_l2_by_hand)."""


@dataclass(frozen=True)
class Contender:
    """One row of a table: a method with its settings; every_checkpoint=False uses the method's default (the last)."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    every_checkpoint: bool = True


CONTENDERS = {
    "source_l1": Contender("source", {"n_segments": 1}),
    "source_l2": Contender("source", {"n_segments": 2}),
    "source_l3": Contender("source", {"n_segments": 3}),
    "ekfac": Contender("ekfac", every_checkpoint=False),
    "trak": Contender("trak"),
    "tracin": Contender("tracin"),
}


def settings(args: argparse.Namespace) -> dict[str, Setting]:
    """The settings by JSON name; --quick shrinks the data, --smoke the data and the model."""
    data = DataSpec(source="sample", max_train=1000 if args.quick else 2000, max_test=100 if args.quick else 200)
    data, model = shrunk(args, data, MODEL)
    rotated_recipe = Recipe(
        (Stage(name="upright", epochs=3, lr=0.05), Stage(name="rotated", epochs=3, lr=0.01, transform="rotate")),
        checkpoints=CheckpointPolicy(every_epochs=1),
    )
    return {
        "not_converged": Setting(
            data, model,
            Recipe((Stage(epochs=2, lr=0.01),), checkpoints=CheckpointPolicy(every_epochs=None, count=N_CHECKPOINTS)),
            "2 epochs of SGD at lr 0.01, far from converged",
        ),
        "rotated": Setting(
            data, model, rotated_recipe,
            "3 epochs on upright images, then 3 epochs on the same images rotated by 90 degrees; upright queries",
        ),
        "rotated_stage2_queries": Setting(
            data, model, rotated_recipe, "the rotated run, its queries rotated as stage 2 sees them", task=StageTwoQueries(),
            run_of="rotated", by_hand=True,
        ),
        "two_stage": Setting(
            data, model,
            Recipe(
                (
                    Stage(name="pretrain", epochs=3, lr=0.05, transform="noise"),
                    Stage(name="finetune", epochs=3, lr=0.01, classes=(0, 1, 2, 3, 4)),
                ),
                checkpoints=CheckpointPolicy(every_epochs=1),
            ),
            "pretrain 3 epochs on noisy pixels (10 classes), fine-tune 3 epochs on clean classes 0-4",
        ),
    }


def the_run(workspace: Workspace, name: str, setting: Setting) -> Run:
    """The setting's run, trained unless the workspace already holds it."""
    run_id = f"b2-{setting.run_of or name}"
    run = (load_run(workspace, run_id) if run_id in workspace.run_ids()
           else train(setting.data, setting.model, setting.recipe, workspace, run_id))
    if len(run.checkpoints) != N_CHECKPOINTS:
        raise SystemExit(f"{run_id}: {len(run.checkpoints)} checkpoints, B2 needs {N_CHECKPOINTS}")
    return run


def checkpoints_of(run: Run, contender: Contender) -> list[int]:
    """The checkpoint indices a contender scores with."""
    return list(range(N_CHECKPOINTS)) if contender.every_checkpoint else default_checkpoints(run, contender.method)


def configuration(run: Run, contender: Contender) -> str:
    """What a row ran with: its checkpoints and the settings it names (the rest are the method's defaults)."""
    checkpoints = checkpoints_of(run, contender)
    named = [f"{name}={value}" for name, value in contender.settings.items()]
    return ", ".join([f"{len(checkpoints)} ckpt" + ("s" if len(checkpoints) > 1 else ""), *named])


def run_summary(run: Run) -> str:
    """Test accuracy at each checkpoint, with its stage: shows whether the run is still improving."""
    accuracies = ", ".join(f"{info.test_accuracy:.3f}" + (f" (stage {info.stage + 1})" if run.recipe.stages[1:] else "")
                           for info in run.checkpoints)
    return f"test accuracy at the checkpoints: {accuracies}"


def evaluate(run: Run, truth: GroundTruth, name: str, task: Task) -> tuple[list[tuple], dict[str, dict]]:
    """Table rows and JSON entries of every contender on one run."""
    rows, payload = [], {}
    for method_name, contender in CONTENDERS.items():
        try:
            with timed() as clock:
                scores = attribute(run, contender.method, settings=contender.settings,
                                   checkpoints=checkpoints_of(run, contender), device="cpu", task=task)
        except SettingsError as error:  # L = 1 in the two-stage run: a segment may not cross a stage
            rows.append((method_name, configuration(run, contender), "n/a", "", ""))
            payload[method_name] = {"lds": None, "stderr": None, "seconds": None, "note": str(error)}
            print(f"{name} {method_name}: n/a ({error})", flush=True)
            continue
        result = lds(scores, truth)
        rows.append((method_name, configuration(run, contender), result.mean, result.stderr, clock.seconds))
        payload[method_name] = {"lds": result.mean, "stderr": result.stderr, "seconds": clock.seconds}
        print(f"{name} {method_name}: LDS {result.mean:.3f} ± {result.stderr:.3f}, {clock.seconds:.1f} s", flush=True)
    if len(run.recipe.stages) > 1:
        with timed() as clock:
            result = lds(source_without_views(run, task), truth)
        rows.append(("source_l2_no_views", "6 ckpts, n_segments=2, plain images, all examples", result.mean, result.stderr, clock.seconds))
        payload["source_l2_no_views"] = {"lds": result.mean, "stderr": result.stderr, "seconds": clock.seconds}
        print(f"{name} source_l2_no_views: LDS {result.mean:.3f} ± {result.stderr:.3f}", flush=True)
    return rows, payload


def by_hand_run(workspace: Workspace, run: Run) -> Run:
    """An MLP run again with its rotate stage inside the model: a plain loop replaying its record, recorded by the Recorder.

    The loop starts from the run's initial weights and takes its recorded batches, learning rates,
    momentum and weight decay (a fresh optimizer per stage, as tdx's trainer does) on the upright
    images; from stage 2 on the model rotates them itself. Raises SystemExit unless the final
    weights equal the run's, which makes the run's ground truth the by-hand run's too.
    """
    run_id = f"{run.run_id}-by-hand"
    if run_id not in workspace.run_ids():
        plan = replay_plan(run)
        train_set, _ = run.datasets()
        model = rotating_mlp(train_set.input_shape, train_set.n_classes, **run.model.options)
        model.network.load_state_dict(plan.initial)
        stage_names = [stage.name for stage in run.recipe.stages]
        checkpoint_steps = {info.step for info in run.checkpoints}
        settings_ = RecorderSettings(overwrite=True)
        with Recorder(workspace, run_id, model=model, factory=BY_HAND_FACTORY, data=run.data, options=run.model.options,
                      seed=run.recipe.seed, settings=settings_) as recorder:
            stage, optimizer = None, None
            for number, step in enumerate(plan.steps, start=plan.first_step):
                if step.stage != stage:
                    stage = step.stage
                    recorder.stage(stage_names[stage])
                    model.rotating.fill_(float(run.recipe.stages[stage].transform == "rotate"))
                    optimizer = torch.optim.SGD(model.parameters(), lr=step.lr, momentum=step.momentum, weight_decay=step.weight_decay)
                for group in optimizer.param_groups:
                    group["lr"] = step.lr
                optimizer.zero_grad()
                losses = plan.task.train_loss(model, train_set.x[step.rows], train_set.y[step.rows])
                losses.mean().backward()
                optimizer.step()
                recorder.step(optimizer, step.rows, losses=losses.detach())
                if number in checkpoint_steps:
                    recorder.checkpoint()
    by_hand = load_run(workspace, run_id)
    final = by_hand.load_model(len(by_hand.checkpoints) - 1).network.state_dict()
    theirs = run.load_model(len(run.checkpoints) - 1).state_dict()
    difference = relative_difference(final, theirs)
    if len(by_hand.checkpoints) != len(run.checkpoints) or difference > SAME_WEIGHTS_TOLERANCE:
        raise SystemExit(f"{run_id}: {len(by_hand.checkpoints)} checkpoints, final weights {difference:.2g} from {run.run_id}'s (relative)")
    print(f"{run_id}: final weights {difference:.2g} from {run.run_id}'s (relative)", flush=True)
    return by_hand


def evaluate_by_hand(workspace: Workspace, run: Run, truth: GroundTruth, name: str) -> tuple[tuple, dict]:
    """The table row and JSON entry of SOURCE (L = 2) on the run with its rotation moved inside the model by hand."""
    by_hand = by_hand_run(workspace, run)
    with timed() as clock:
        # the plain Task: the by-hand model rotates the query itself at stage-2 checkpoints
        scores = attribute(by_hand, "source", settings={"n_segments": 2}, checkpoints=list(range(N_CHECKPOINTS)), device="cpu")
    result = lds(scores, truth)
    print(f"{name} source_l2_by_hand: LDS {result.mean:.3f} ± {result.stderr:.3f}", flush=True)
    return (("source_l2_by_hand", "6 ckpts, n_segments=2, rotation inside the model, no views", result.mean, result.stderr, clock.seconds),
            {"lds": result.mean, "stderr": result.stderr, "seconds": clock.seconds})


def source_with_scaled_lr_sums(run: Run, base: Scores, factor: float, task: Task) -> Scores:
    """SOURCE (L = 2) scores of every test image with each segment's η̄K multiplied by factor."""
    prepared = prepare(run, "source", settings={"n_segments": 2}, device="cpu", task=task)
    inputs, method = prepared.inputs, prepared.method
    inputs.segments = [Segment(segment.models, segment.lr_sum * factor, segment.weights) for segment in inputs.segments]
    _, test_set = run.datasets()
    return dataclasses.replace(base, values=method.score(method.fit(inputs), inputs, test_set.x, test_set.y).numpy())


def source_without_views(run: Run, task: Task) -> Scores:
    """SOURCE (L = 2) as scored before the record was read: plain training images at every checkpoint, every example in every segment."""
    prepared = prepare(run, "source", settings={"n_segments": 2}, device="cpu", task=task)
    inputs = dataclasses.replace(prepared.inputs, views=None, weights=None,
                                 segments=[Segment(segment.models, segment.lr_sum) for segment in prepared.inputs.segments])
    method, (_, test_set) = prepared.method, run.datasets()
    values = method.score(method.fit(inputs), inputs, test_set.x, test_set.y).numpy()
    train_set = run.datasets()[0]
    return Scores(values, "source", {"n_segments": 2, "views": False}, prepared.checkpoints, train_set.ids, test_set.y.numpy(),
                  [], query_indices=np.arange(len(test_set)))


def sensitivity(run: Run, truth: GroundTruth, task: Task) -> list[tuple]:
    """Rows (variant, LDS, ± s.e.): EK-FAC dampings, SOURCE's η̄K scaled, SOURCE's segments alone."""
    variants = {f"ekfac, damping_ratio={ratio:g}": attribute(run, "ekfac", settings={"damping_ratio": ratio}, device="cpu", task=task)
                for ratio in DAMPING_RATIOS}
    base = attribute(run, "source", settings={"n_segments": 2}, device="cpu", task=task)
    segments = prepare(run, "source", settings={"n_segments": 2}, device="cpu", task=task).inputs.segments
    lr_sums = ", ".join(f"{segment.lr_sum:.3g}" for segment in segments)
    variants |= {f"source_l2, η̄K × {factor:g} (unscaled: {lr_sums})": source_with_scaled_lr_sums(run, base, factor, task)
                 for factor in LR_SUM_FACTORS}
    variants |= {f"source_l2, segment {index + 1} of 2 alone": base.restricted_to_segments([index]) for index in range(2)}
    rows = []
    for label, scores in variants.items():
        result = lds(scores, truth)
        rows.append((label, result.mean, result.stderr))
        print(f"  {label}: LDS {result.mean:.3f} ± {result.stderr:.3f}", flush=True)
    return rows


def verdict(methods: dict[str, dict]) -> str:
    """The best SOURCE row minus EK-FAC influence, in LDS."""
    source = {name: entry["lds"] for name, entry in methods.items()
              if name.startswith("source") and name not in ("source_l2_no_views", "source_l2_by_hand") and entry["lds"] is not None}
    best = max(source, key=source.get)
    return f"best SOURCE ({best}) minus EK-FAC influence: {source[best] - methods['ekfac']['lds']:+.3f} LDS"


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    add_workers_option(arguments, default=2)
    arguments.add_argument("--sensitivity", action="store_true", help="also vary EK-FAC damping and SOURCE's η̄K and segments")
    args = arguments.parse_args()
    lds_settings = LdsSettings(n_subsets=by_mode(args, full=100, quick=20, smoke=4), alpha=0.5, seed=0)
    sections, payload = [], {}
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        for name, setting in settings(args).items():
            with timed() as training:
                run = the_run(workspace, name, setting)
            with timed() as retraining:
                truth = groundtruth(run, lds_settings, workers=workers(args), task=setting.task)
            rows, methods = evaluate(run, truth, name, setting.task)
            if setting.by_hand:
                row, methods["source_l2_by_hand"] = evaluate_by_hand(workspace, run, truth, name)
                rows.append(row)
            payload[name] = {"methods": methods, "groundtruth_seconds": retraining.seconds}
            sections.append(
                f"### {name}: {setting.description}\n\n"
                f"{len(run.datasets()[0])} train / {len(run.datasets()[1])} test images, trained in {training.seconds:.1f} s; "
                f"{run_summary(run)}. Ground truth: {lds_settings.n_subsets} subsets × {lds_settings.seeds_per_subset} seed, "
                f"alpha {lds_settings.alpha}, {retraining.seconds:.1f} s with {workers(args)} worker(s). "
                f"{verdict(methods)}.\n\n"
                + markdown_table(["method", "configuration", "LDS", "± s.e.", "seconds"], rows)
            )
            if args.sensitivity or args.smoke:  # a smoke run covers the optional part too
                variants = sensitivity(run, truth, setting.task)
                payload[name]["sensitivity"] = {label: {"lds": mean, "stderr": stderr} for label, mean, stderr in variants}
                sections.append(f"Sensitivity ({name}):\n\n" + markdown_table(["variant", "LDS", "± s.e."], variants))
    body = ("Settings not named are the method's defaults; seconds include the train-side work (features, "
            "curvature) and scoring every test image.\n\n" + "\n\n".join(sections))
    report("b2", "B2 · SOURCE's regime on Fashion-MNIST", body, args, {"settings": payload})


if __name__ == "__main__":
    main()
