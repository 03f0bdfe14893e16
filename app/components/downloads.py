"""A run's flags as files other tools read, made when a download button is pressed: CSV, cleanlab's mask, a FiftyOne dataset.

The files are the ones `tdx flags export` writes (attribution_core.exports.export_flags), made in a
temporary folder and returned as bytes; the cleanlab mask (with the sidecar naming its positions) and
the FiftyOne dataset directory come zipped.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from attribution_core.annotations import Annotations
from attribution_core.exports import export_flags, flags_csv
from attribution_core.runs.run import Run

MASK_FILE = "label_issues.npy"
"""The mask's name inside the cleanlab .zip (its sidecar is MASK_FILE + '.json')."""


def flags_table(run: Run, store: Annotations) -> str:
    """The flags CSV text (exports.FLAG_COLUMNS): what the CSV download holds and the page's table of verdicts shows."""
    return flags_csv(run, store.flags(run.run_id))


def cleanlab_zip(run: Run, store: Annotations) -> bytes:
    """A .zip of label_issues.npy, the (N,) bool mask True where flagged mislabeled (cleanlab's label_issues), and its .json."""
    with tempfile.TemporaryDirectory() as folder:
        return _zipped(export_flags(run, store, "cleanlab", Path(folder) / MASK_FILE), Path(folder))


def fiftyone_zip(run: Run, store: Annotations) -> bytes:
    """A .zip holding one folder, <run>-flags/, of the flagged examples in FiftyOne's layout (metadata.json, samples.json, data/)."""
    with tempfile.TemporaryDirectory() as folder:
        (directory,) = export_flags(run, store, "fiftyone", Path(folder) / fiftyone_folder(run))
        return _zipped(sorted(path for path in directory.rglob("*") if path.is_file()), Path(folder))


def fiftyone_folder(run: Run) -> str:
    """The folder name inside the FiftyOne .zip."""
    return f"{run.run_id}-flags"


def _zipped(files: list[Path], base: Path) -> bytes:
    """The files as a .zip, each stored under its path relative to base."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, path.relative_to(base))
    return buffer.getvalue()
