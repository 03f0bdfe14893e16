"""The cleaned data set as files the project (and the user's own code) reads, with the plan beside it.

- npz: `x` (the kept training images, uint8 (n, H, W[, 3]) when that is lossless, else the float32
  model inputs (n, C, H, W)), `y` (their labels after the plan), `ids` (their example ids),
  `class_names`, and the run's test set as `x_test`, `y_test`, `ids_test`, so that
  `DataSpec(source="npz", path=...)` reads back exactly the cleaned training set and the run's test set;
- image_folder: one sub-folder per class (named by its index and name, sorted in class order) of
  PNGs named by example id, which `DataSpec(source="image_folder", path=...)` reads (it splits them
  into train and test itself);
- plan.csv beside either (plan.plan_csv), and the plan's JSON.
Every file is written atomically; an export that fails part-way removes what it wrote.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from ..data import Dataset
from ..exports import ExportError, _png, _write_files
from ..runs.run import Run
from .plan import CleaningPlan, plan_arrays, plan_csv

FORMATS = ("npz", "image_folder")


def cleaned_training_set(run: Run, plan: CleaningPlan) -> Dataset:
    """The run's training set as the plan leaves it: removed examples out, relabelled ones with their new class."""
    keep, labels = plan_arrays(run, plan)
    train_set, _ = run.datasets()
    cleaned = train_set.subset(keep)
    return Dataset(x=cleaned.x, y=cleaned.y.new_tensor(labels[keep]), class_names=cleaned.class_names, images=cleaned.images,
                   ids=cleaned.ids, provenance={**cleaned.provenance, "cleaning_plan": plan.key()})


def _lossless_images(dataset: Dataset) -> np.ndarray | None:
    """The display images (uint8) when dividing them by 255 gives exactly the model inputs, else None."""
    images = dataset.images if dataset.images.ndim == 4 else dataset.images[..., None]
    as_inputs = np.moveaxis(images, -1, 1).astype(np.float32) / 255
    return dataset.images if as_inputs.shape == tuple(dataset.x.shape) and np.array_equal(as_inputs, dataset.x.numpy()) else None


def _model_inputs(dataset: Dataset) -> np.ndarray:
    """What the npz stores as images: lossless uint8 display images, else the float32 model inputs."""
    lossless = _lossless_images(dataset)
    return lossless if lossless is not None else dataset.x.numpy()


def npz_bytes(run: Run, plan: CleaningPlan) -> bytes:
    """The cleaned training set and the run's test set as one .npz (see the module docstring)."""
    cleaned = cleaned_training_set(run, plan)
    _, test_set = run.datasets()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=_model_inputs(cleaned), y=cleaned.y.numpy(), ids=cleaned.ids, class_names=np.asarray(cleaned.class_names),
                        x_test=_model_inputs(test_set), y_test=test_set.y.numpy(), ids_test=test_set.ids)
    return buffer.getvalue()


def class_folder(index: int, name: str) -> str:
    """A class's folder name: its index (so sorted folders keep the class order) and its name made safe for a path."""
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'class'}"


def image_folder_files(run: Run, plan: CleaningPlan) -> dict[Path, bytes]:
    """{relative path: PNG bytes}: the cleaned training set, one sub-folder per class, one PNG per example named by its id."""
    cleaned = cleaned_training_set(run, plan)
    folders = [class_folder(index, name) for index, name in enumerate(cleaned.class_names)]
    return {Path(folders[int(label)]) / f"{int(example_id):08d}.png": _png(image)
            for image, label, example_id in zip(cleaned.images, cleaned.y.tolist(), cleaned.ids.tolist())}


def export_cleaned(run: Run, plan: CleaningPlan, fmt: str, path: str | Path) -> list[Path]:
    """Write the cleaned data as `fmt` (a .npz file, or an image folder) with plan.csv and plan.json beside it; the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"cleaned data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(path)
    beside = path.parent if fmt == "npz" else path
    plan_files = {beside / "plan.csv": plan_csv(run, plan).encode(), beside / "plan.json": _plan_json(plan)}
    data = {path: npz_bytes(run, plan)} if fmt == "npz" else {path / name: png for name, png in image_folder_files(run, plan).items()}
    return _write_files({**data, **plan_files})  # the plan last: a folder with plan.json holds all of its data


def _plan_json(plan: CleaningPlan) -> bytes:
    return json.dumps({**plan.to_json(), "key": plan.key()}, indent=1, sort_keys=True).encode()
