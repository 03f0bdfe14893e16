"""Exports for other tools: cleanlab's label-issues mask, a FiftyOne dataset of the flagged examples, score files.

Flags are keyed by example id (`Dataset.ids`), not by position, so every export maps ids to training
indices through the run's training set and refuses flags on ids that set does not hold. Every export names
a training example the same ways: train_index (its row in the run's training set, the app's "#N", a mask's
position), example_id (the dataset's id; train_id in score files), its given label and, for flags, the
suggested one. Every file is
written atomically (store.atomic_write_bytes); an export of several files that fails part-way removes
the files it had written, so a failure never leaves half an export behind.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .annotations import FLAG_KINDS, Annotations, Flag, escape_cell
from .data import Dataset
from .errors import SettingsError, TdxError, WorkspaceError
from .runs.run import Run
from .scores import Scores
from .store import atomic_write_bytes

SCORE_SUFFIXES = (".npy", ".parquet", ".csv")
FLAG_FORMATS = ("csv", "cleanlab", "fiftyone")
SCORES_FORMAT = 1
"""Version of the .npy sidecar's layout; bump when its keys change."""
CSV_COLUMNS = ("query", "query_label", "rank", "kind", "train_index", "train_id", "train_label", "score")
"""The top-k scores CSV: train_index is the example's row in the training set (the app's #N), train_id its example id,
train_label its given class."""
FLAG_COLUMNS = ("run_id", "train_index", "example_id", "kind", "given_label", "given_class", "suggested_label",
                "suggested_class", "note", "updated_at")
"""The flags CSV, one row per verdict: the example's row in the training set (the app's #N, the cleanlab mask's position),
its example id, the verdict, the given and the suggested label (class index and name; empty when none was suggested)."""
MASK_FORMAT = 1
"""Version of the cleanlab mask's sidecar layout; bump when its keys change."""


class ExportError(TdxError):
    """An export cannot be written as asked (unknown file type, unwritable path, missing parquet engine)."""


def label_issues_mask(flags: Mapping[int, Flag], train_ids: np.ndarray, kinds: Iterable[str] = ("mislabeled",)) -> np.ndarray:
    """(N,) bool over the training set, True where the user flagged the example with one of `kinds`: cleanlab's `label_issues` layout."""
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in FLAG_KINDS]
    if unknown:
        raise SettingsError(f"flag kinds {unknown}: choose among {', '.join(FLAG_KINDS)}")
    positions = _train_positions(flags, train_ids)
    mask = np.zeros(len(train_ids), dtype=bool)
    mask[[positions[example_id] for example_id, flag in flags.items() if flag.kind in kinds]] = True
    return mask


def save_label_issues(path: str | Path, mask: np.ndarray, describe: Mapping[str, Any] | None = None) -> list[Path]:
    """Write a (N,) bool label-issues mask as .npy (np.load(path) gives it back), with describe as <path>.json; returns the files.

    describe: what names the mask's positions (mask_sidecar); no sidecar without it.
    """
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(mask, dtype=bool), allow_pickle=False)
    path = Path(path)
    files = {path: buffer.getvalue()}
    if describe is not None:
        files[sidecar_path(path)] = _json_bytes({**describe, "file": path.name})
    return _write_files(files)


def mask_sidecar(run: Run, flags: Mapping[int, Flag]) -> dict[str, Any]:
    """What names a label-issues mask's positions: per training index, the example id, the given and the suggested label.

    suggested_label is None where the example has no suggestion; class_names gives each label's name.
    """
    train_set, _ = run.datasets()
    positions = _train_positions(flags, train_set.ids)
    suggested: list[int | None] = [None] * len(train_set)
    for example_id, flag in flags.items():
        suggested[positions[example_id]] = flag.suggested_label
    return {
        "format": MASK_FORMAT, "run_id": run.run_id,
        "layout": "label_issues[i] is True where training example i (train_index i, the app's #i) was flagged mislabeled; "
                  "example_id[i], given_label[i] and suggested_label[i] describe the same example",
        "shape": [len(train_set)], "example_id": train_set.ids.tolist(), "given_label": train_set.y.tolist(),
        "suggested_label": suggested, "class_names": list(train_set.class_names),
    }


def flags_csv(run: Run, flags: Mapping[int, Flag]) -> str:
    """The flags as CSV text (FLAG_COLUMNS), one row per verdict in training-set order; cells escaped against formula injection."""
    train_set, _ = run.datasets()
    names = train_set.class_names
    positions = _train_positions(flags, train_set.ids)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FLAG_COLUMNS)
    for example_id, flag in sorted(flags.items(), key=lambda item: positions[item[0]]):
        index = positions[example_id]
        given = int(train_set.y[index])
        suggested = ("", "") if flag.suggested_label is None else (flag.suggested_label, names[flag.suggested_label])
        writer.writerow([escape_cell(str(value)) for value in (run.run_id, index, example_id, flag.kind, given, names[given],
                                                                *suggested, flag.note, flag.updated_at)])
    return buffer.getvalue()


def fiftyone_dataset(run: Run, flags: Mapping[int, Flag]) -> dict[str, Any]:
    """{"metadata": metadata.json, "samples": [one sample per verdict in `flags`, "fine" included, by training index]} for FiftyOne.

    Written by export_fiftyone in the layout documented as `fiftyone.types.LegacyFiftyOneDataset`
    (metadata.json, samples.json, data/): its samples are plain `Sample.to_dict()` documents, which
    we can produce without FiftyOne; the current layout stores raw database documents (ObjectIds,
    a versioned dataset document) that only FiftyOne itself writes. `fo.types.FiftyOneDataset`
    imports this layout too (metadata.json has no "version", which FiftyOne reads as the legacy one).
    Each sample: filepath (relative to the export directory), tags ([the flag kind]), ground_truth
    (Classification of the run's training label), suggested_label (Classification; only when the
    user suggested one), note, train_index (position in the run's training set), example_id.
    """
    train_set, _ = run.datasets()
    positions = _train_positions(flags, train_set.ids)
    samples = []
    for example_id, flag in sorted(flags.items(), key=lambda item: positions[item[0]]):
        index = positions[example_id]
        sample: dict[str, Any] = {
            "filepath": _image_name(index),
            "tags": [flag.kind],
            "ground_truth": _classification(train_set.class_names[int(train_set.y[index])]),
            "note": flag.note,
            "train_index": index,
            "example_id": int(example_id),
        }
        if flag.suggested_label is not None:
            sample["suggested_label"] = _classification(train_set.class_names[flag.suggested_label])
        samples.append(sample)
    # "classes" in info becomes the dataset's default_classes on import; the rest stays in dataset.info.
    info = {"classes": list(train_set.class_names), "run_id": run.run_id, "exported_by": "tda-explorer"}
    return {"metadata": {"name": f"{run.run_id}-flags", "media_type": "image", "info": info}, "samples": samples}


def export_fiftyone(run: Run, flags: Mapping[int, Flag], directory: str | Path) -> Path:
    """Write the flagged examples as a FiftyOne dataset directory (data/*.png, metadata.json, samples.json); returns it.

    Load it with `fo.Dataset.from_dir(directory, dataset_type=fo.types.FiftyOneDataset)`.
    """
    directory = Path(directory)
    dataset = fiftyone_dataset(run, flags)
    train_set, _ = run.datasets()
    files = {directory / sample["filepath"]: _png(train_set.images[sample["train_index"]]) for sample in dataset["samples"]}
    files[directory / "metadata.json"] = _json_bytes(dataset["metadata"])
    # samples.json last: an import never meets a sample whose image is not written yet.
    files[directory / "samples.json"] = _json_bytes({"samples": dataset["samples"]})
    _write_files(files)
    return directory


def export_flags(run: Run, annotations: Annotations, fmt: str, path: str | Path) -> list[Path]:
    """Write a run's flags as `fmt` and return what was written.

    csv: the flags table (flags_csv); cleanlab: the (N,) mislabeled mask .npy and its sidecar <path>.json naming each
    position (mask_sidecar); fiftyone: a dataset directory (export_fiftyone).
    """
    if fmt not in FLAG_FORMATS:
        raise ExportError(f"flags export format {fmt!r}: choose one of {', '.join(FLAG_FORMATS)}")
    train_set, _ = run.datasets()
    flags = annotations.flags(run.run_id)
    if fmt == "csv":
        return _write_files({Path(path): flags_csv(run, flags).encode()})
    if fmt == "cleanlab":
        return save_label_issues(path, label_issues_mask(flags, train_set.ids), mask_sidecar(run, flags))
    return [export_fiftyone(run, flags, path)]


def save_scores(path: str | Path, scores: Scores, train_set: Dataset, *, top: int = 10) -> list[Path]:
    """Write scores by the path's suffix (SCORE_SUFFIXES) and return the files written.

    .npy: the (n_queries, n_train) float32 matrix, plus <path>.json (sidecar_path) naming its rows
    and columns; .parquet: a long table (query, train_index, train_id, score), one row per pair; .csv: the
    `top` proponents and opponents of each query (CSV_COLUMNS).
    """
    path = Path(path)
    suffix = score_suffix(path)
    if not np.array_equal(scores.train_ids, train_set.ids):
        raise ExportError("the scores' training ids differ from this training set's: export scores with the run that made them")
    values = np.asarray(scores.values, dtype=np.float32)
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        description = {
            "format": SCORES_FORMAT,
            "layout": "values[q, m]: score of training example train_ids[m] for query query_names[q]; positive = proponent",
            "file": path.name,
            "shape": list(values.shape),
            **_description(scores),
            "train_ids": scores.train_ids.tolist(),
            "train_labels": train_set.y.numpy().tolist(),
            "class_names": list(train_set.class_names),
            "query_labels": np.asarray(scores.query_labels).tolist(),
        }
        return _write_files({path: buffer.getvalue(), sidecar_path(path): _json_bytes(description)})
    if suffix == ".parquet":
        return _write_files({path: _parquet_bytes(values, scores)})
    if top < 1:
        raise ExportError(f"--out-top {top}: the CSV needs at least 1 proponent and opponent per query")
    return _write_files({path: _top_csv(scores, train_set, top).encode()})


def score_suffix(path: str | Path) -> str:
    """The path's score file type (one of SCORE_SUFFIXES), checked before any scoring: an unknown one, or .parquet without
    pyarrow, is an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SCORE_SUFFIXES:
        raise ExportError(
            f"{path}: unknown score file type {path.suffix or '(none)'!r}; use .npy (matrix, with a .json sidecar of ids), "
            ".parquet (long table) or .csv (top k per query)"
        )
    if suffix == ".parquet":
        try:
            importlib.import_module("pyarrow.parquet")
        except ImportError as exc:
            raise ExportError(f"{path}: writing .parquet needs pyarrow: pip install pyarrow (or write .npy or .csv)") from exc
    return suffix


def sidecar_path(path: str | Path) -> Path:
    """The JSON file beside a .npy (score matrix, label-issues mask) that names its rows and columns (<path>.json)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _train_positions(flags: Mapping[int, Flag], train_ids: np.ndarray) -> dict[int, int]:
    """{example id: training index} of every flagged id; an id the training set lacks is an error."""
    index_of = {int(example_id): index for index, example_id in enumerate(np.asarray(train_ids).tolist())}
    missing = sorted(example_id for example_id in flags if example_id not in index_of)
    if missing:
        raise ExportError(
            f"flags name example ids {missing[:10]}{' …' if len(missing) > 10 else ''} that the run's training set "
            "does not hold: were they flagged on another run's data?"
        )
    return {example_id: index_of[example_id] for example_id in flags}


def _image_name(index: int) -> str:
    return f"data/train_{index:06d}.png"


def _classification(label: str) -> dict[str, str]:
    """A fiftyone.core.labels.Classification as Sample.to_dict() writes it."""
    return {"_cls": "Classification", "label": label}


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) display image."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _description(scores: Scores) -> dict[str, Any]:
    """What identifies a score matrix apart from its ids: method, settings, checkpoints, stored key, queries."""
    return {
        "method": scores.method,
        "settings": scores.settings,
        "checkpoints": list(scores.checkpoints),
        "key": scores.key,
        "query_names": list(scores.query_names),
        "query_indices": None if scores.query_indices is None else np.asarray(scores.query_indices).tolist(),
    }


def _json_bytes(payload: Any) -> bytes:
    # Settings may hold numpy scalars or arrays; they become plain JSON numbers and lists.
    def plain(value: Any) -> Any:
        if isinstance(value, (np.ndarray, np.generic)):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

    return json.dumps(payload, indent=1, sort_keys=True, default=plain).encode()


def _parquet_bytes(values: np.ndarray, scores: Scores) -> bytes:
    """A parquet long table, one row per (query, training example), with _description in the schema metadata."""
    import pyarrow as pa  # present: score_suffix checked
    import pyarrow.parquet as pq

    n_queries, n_train = values.shape
    table = pa.table({
        "query": pa.array(np.repeat(np.asarray(scores.query_names, dtype=object), n_train), type=pa.string()),
        "train_index": pa.array(np.tile(np.arange(n_train, dtype=np.int64), n_queries)),
        "train_id": pa.array(np.tile(np.asarray(scores.train_ids, dtype=np.int64), n_queries)),
        "score": pa.array(values.reshape(-1)),
    }).replace_schema_metadata({"tdx_scores": _json_bytes(_description(scores))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _top_csv(scores: Scores, train_set: Dataset, top: int) -> str:
    """CSV_COLUMNS rows: per query, its `top` proponents (rank 1 = highest score), then its `top` opponents (rank 1 = lowest)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    names = train_set.class_names
    for query in range(scores.n_queries):
        query_cells = (escape_cell(scores.query_names[query]), escape_cell(names[int(scores.query_labels[query])]))
        for kind, (indices, row) in (("proponent", scores.top_proponents(query, top)), ("opponent", scores.top_opponents(query, top))):
            for rank, (index, score) in enumerate(zip(indices, row), start=1):
                writer.writerow((*query_cells, rank, kind, int(index), int(train_set.ids[index]),
                                 escape_cell(names[int(train_set.y[index])]), float(score)))
    return buffer.getvalue()


def _write_files(files: Mapping[Path, bytes]) -> list[Path]:
    """Write each file atomically, in order; on a failure remove the ones this call wrote and raise ExportError."""
    written: list[Path] = []
    for path, data in files.items():
        try:
            atomic_write_bytes(path, data)
        except WorkspaceError as exc:
            for done in written:
                with contextlib.suppress(OSError):
                    done.unlink()
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
            raise ExportError(f"cannot write {path}: {reason}; choose a writable --out (nothing was exported)") from exc
        written.append(path)
    return written
