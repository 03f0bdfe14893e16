"""The demo workspace: four runs on the shipped Fashion-MNIST sample that show what the tool is for.

- fmnist-mlp: trained to convergence (influence functions' home ground);
- fmnist-mlp-early: stopped early while still improving (where SOURCE should beat IF);
- fmnist-two-stage: pretrain on all classes with noisy pixels, then fine-tune on clean
  images of five classes (a multi-stage pipeline, SOURCE's case);
- fmnist-noisy: 10 % of training labels flipped, for mislabel detection.
Each run keeps six evenly spaced checkpoints (plus the end of each stage).

`tdx demo --full` adds fmnist-cnn-full: the CNN on all 60,000 Fashion-MNIST training images (the
IDX files of Debian's dataset-fashion-mnist), the scale the app must stay quick at.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import FASHION_MNIST_DIR, DataSpec
from ..errors import DataError
from ..models import ModelSpec
from ..progress import ProgressFn
from ..store import Workspace
from .run import CheckpointPolicy, Recipe, Stage, load_run
from .training import train


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo workspace."""

    run_id: str
    data: DataSpec
    model: ModelSpec
    recipe: Recipe
    description: str


def demo_runs(tiny: bool = False) -> list[DemoRun]:
    """The demo's runs; tiny=True shrinks data and epochs for tests (same structure)."""
    data = DataSpec(source="sample", max_train=600 if tiny else 3000, max_test=100 if tiny else 500)
    mlp = ModelSpec("mlp", {"hidden": [128]})
    six = CheckpointPolicy(every_epochs=None, count=6)

    def epochs(n: int) -> int:
        return max(1, n // 4) if tiny else n

    return [
        DemoRun("fmnist-mlp", data, mlp, Recipe((Stage(epochs=epochs(12), lr=0.05, schedule="cosine"),), checkpoints=six),
                "MLP trained to convergence (cosine schedule)"),
        DemoRun("fmnist-mlp-early", data, mlp, Recipe((Stage(epochs=2, lr=0.01),), checkpoints=six),
                "MLP stopped after 2 epochs, still improving"),
        DemoRun(
            "fmnist-two-stage",
            data,
            mlp,
            Recipe(
                (
                    Stage(name="pretrain", epochs=epochs(4), lr=0.05, transform="noise"),
                    Stage(name="finetune", epochs=epochs(4), lr=0.01, classes=(0, 1, 2, 3, 4)),
                ),
                checkpoints=six,
            ),
            "pretrain on noisy pixels, fine-tune on five clean classes",
        ),
        DemoRun("fmnist-noisy", replace(data, noise_fraction=0.1, noise_seed=0), mlp,
                Recipe((Stage(epochs=epochs(12), lr=0.05, schedule="cosine"),), checkpoints=six),
                "10 % of training labels flipped"),
    ]


FULL_RUN_ID = "fmnist-cnn-full"
"""The run `tdx demo --full` adds."""


def full_run(path: str = FASHION_MNIST_DIR) -> DemoRun:
    """The CNN on all 60,000 Fashion-MNIST training images (10,000 test images), three epochs."""
    recipe = Recipe((Stage(epochs=3, lr=0.05, batch_size=128, schedule="cosine"),),
                    checkpoints=CheckpointPolicy(every_epochs=None, count=6))
    return DemoRun(FULL_RUN_ID, DataSpec(source="fashion_mnist", path=path), ModelSpec("cnn", {}), recipe,
                   "CNN on all 60,000 Fashion-MNIST training images")


def build_demo(
    workspace: Workspace,
    *,
    tiny: bool = False,
    full: bool = False,
    progress_for: Callable[[str], ProgressFn] = lambda run_id: (lambda done, total: None),
) -> list[str]:
    """Train every demo run not yet in the workspace, or stored without a training record (a killed build resumes); returns the run ids.

    A run from before training records existed is trained again with its own seed and recipe: the
    same weights, now with every step's batch and losses recorded. full=True adds full_run(), and
    refuses at once, before training anything, when the Fashion-MNIST files are missing.
    """
    runs = demo_runs(tiny)
    if full:
        if not any(Path(FASHION_MNIST_DIR).glob("train-images-idx3-ubyte*")):
            raise DataError(f"tdx demo --full trains on all of Fashion-MNIST, and its files are not in {FASHION_MNIST_DIR}: "
                            "install Debian's package (apt-get install dataset-fashion-mnist) and run it again")
        runs.append(full_run())
    existing = set(workspace.run_ids())
    for run in runs:
        if run.run_id not in existing or not _has_record(workspace, run.run_id):
            train(run.data, run.model, run.recipe, workspace, run.run_id, progress=progress_for(run.run_id))
    return [run.run_id for run in runs]


def _has_record(workspace: Workspace, run_id: str) -> bool:
    """Whether a stored run opens with its training record (False for older runs and for a record that went missing)."""
    try:
        return load_run(workspace, run_id).record is not None
    except DataError:
        return False
