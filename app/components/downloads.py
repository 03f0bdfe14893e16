"""A run's flags as files other tools read, made when a download button is pressed: CSV, cleanlab's mask, a FiftyOne dataset.

The files are the ones `tdx flags export` writes (attribution_core.exports.export_flags), made in a
temporary folder and returned as bytes; the FiftyOne dataset directory comes zipped.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from attribution_core.annotations import Annotations
from attribution_core.exports import export_flags
from attribution_core.runs.run import Run


def cleanlab_mask(run: Run, store: Annotations) -> bytes:
    """The .npy of the (N,) bool mask over the run's training set, True where flagged mislabeled (cleanlab's label_issues)."""
    with tempfile.TemporaryDirectory() as folder:
        return export_flags(run, store, "cleanlab", Path(folder) / "label_issues.npy").read_bytes()


def fiftyone_zip(run: Run, store: Annotations) -> bytes:
    """A .zip holding one folder, <run>-flags/, of the flagged examples in FiftyOne's layout (metadata.json, samples.json, data/)."""
    name = fiftyone_folder(run)
    with tempfile.TemporaryDirectory() as folder:
        directory = export_flags(run, store, "fiftyone", Path(folder) / name)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(name) / path.relative_to(directory))
        return buffer.getvalue()


def fiftyone_folder(run: Run) -> str:
    """The folder name inside the FiftyOne .zip."""
    return f"{run.run_id}-flags"
