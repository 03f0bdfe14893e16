"""Exports for other tools: cleanlab's label-issues mask, a FiftyOne dataset of the flags, score files, and their CLI."""
from __future__ import annotations

import csv
import errno
import io
import json
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from attribution_core.annotations import Annotations
from attribution_core.api import attribute
from attribution_core.cli import main as tdx
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError
from attribution_core.exports import (
    CSV_COLUMNS,
    FLAG_COLUMNS,
    ExportError,
    export_fiftyone,
    export_flags,
    label_issues_mask,
    save_label_issues,
    save_scores,
    sidecar_path,
)
from attribution_core.models import ModelSpec
from attribution_core.runs.run import Recipe, Stage
from attribution_core.runs.training import train
from attribution_core.scores import Scores
from attribution_core.store import Workspace


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch digits MLP: 60 training examples (ids are not positions), 50 test examples."""
    data = DataSpec(source="digits", test_size=50, max_train=60)
    return train(data, ModelSpec("mlp", {"hidden": [8]}), Recipe((Stage(epochs=1),)), Workspace(tmp_path_factory.mktemp("ws")), "tiny")


@pytest.fixture
def scores(run) -> Scores:
    """Hand-made scores of three queries over the run's training set, with ties and negative values."""
    train_set, _ = run.datasets()
    values = np.random.default_rng(0).integers(-5, 6, size=(3, len(train_set))).astype(np.float32) / 4
    return Scores(values, "graddot", {"normalize": False}, [0], train_set.ids, np.array([1, 7, 3]),
                  ["test 4", "test 9", "=HYPERLINK(\"x\")"], np.array([4, 9, 11]), key="abc123")


def _flags(tmp_path, run_id: str, verdicts: dict[int, tuple]):
    """The flags store after setting {example id: (kind, suggested label, note)}."""
    annotations = Annotations(tmp_path / "annotations.sqlite")
    for example_id, (kind, suggested, note) in verdicts.items():
        annotations.set_flag(run_id, example_id, kind, suggested_label=suggested, note=note)
    return annotations.flags(run_id)


def _fail_writes_after(monkeypatch, allowed: int) -> None:
    """Let `allowed` atomic writes succeed, then make every temp file fail as on a read-only folder."""
    real = tempfile.mkstemp
    calls = []

    def mkstemp(*args, **kwargs):
        calls.append(1)
        if len(calls) > allowed:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", mkstemp)


def test_label_issues_mask_is_true_exactly_at_the_positions_of_examples_flagged_mislabeled(tmp_path):
    train_ids = np.array([40, 7, 19, 3, 25, 8])
    flags = _flags(tmp_path, "r", {7: ("mislabeled", 2, ""), 25: ("mislabeled", None, "blurry"), 3: ("outlier", None, ""),
                                   40: ("fine", None, "")})
    np.testing.assert_array_equal(label_issues_mask(flags, train_ids), [False, True, False, False, True, False])
    np.testing.assert_array_equal(label_issues_mask(flags, train_ids, kinds=("mislabeled", "outlier")),
                                  [False, True, False, True, True, False])
    np.testing.assert_array_equal(label_issues_mask({}, train_ids), np.zeros(6, dtype=bool))


def test_label_issues_mask_has_cleanlabs_layout_and_cleanlab_ranks_exactly_the_flagged_examples(tmp_path):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import order_label_issues

    rng = np.random.default_rng(1)
    labels = np.arange(60) % 3
    pred_probs = rng.dirichlet(np.ones(3), size=60)
    train_ids = np.arange(100, 160)
    flags = _flags(tmp_path, "r", {105: ("mislabeled", None, ""), 131: ("mislabeled", 0, ""), 150: ("ambiguous", None, "")})
    mask = label_issues_mask(flags, train_ids)
    reference = find_label_issues(labels, pred_probs, return_indices_ranked_by=None)
    assert mask.dtype == reference.dtype == np.bool_ and mask.shape == reference.shape == (60,)
    assert sorted(order_label_issues(mask, labels, pred_probs)) == [5, 31]
    np.testing.assert_array_equal(np.flatnonzero(mask), [5, 31])


def test_a_saved_label_issues_mask_loads_back_without_pickle(tmp_path):
    mask = np.array([False, True, True, False])
    (path,) = save_label_issues(tmp_path / "issues.npy", mask)
    loaded = np.load(path, allow_pickle=False)
    assert loaded.dtype == np.bool_
    np.testing.assert_array_equal(loaded, mask)


@pytest.mark.badinput
def test_a_flag_on_an_id_outside_the_training_set_or_an_unknown_kind_is_refused(tmp_path):
    flags = _flags(tmp_path, "r", {7: ("mislabeled", None, ""), 999: ("mislabeled", None, "")})
    with pytest.raises(ExportError, match=r"example ids \[999\] that the run's training set does not hold"):
        label_issues_mask(flags, np.array([7, 8]))
    with pytest.raises(SettingsError, match="flag kinds \\['wrong'\\]: choose among mislabeled, ambiguous, outlier, fine"):
        label_issues_mask({}, np.array([7, 8]), kinds=("wrong",))


def test_fiftyone_export_holds_one_sample_per_flag_with_its_tag_labels_and_image(run, tmp_path):
    train_set, _ = run.datasets()
    ids, names = train_set.ids, train_set.class_names
    flags = _flags(tmp_path, run.run_id, {int(ids[10]): ("mislabeled", 4, "looks like a 4"), int(ids[3]): ("outlier", None, ""),
                                          int(ids[20]): ("fine", None, "checked")})
    directory = export_fiftyone(run, flags, tmp_path / "fo")
    samples = json.loads((directory / "samples.json").read_text())["samples"]
    metadata = json.loads((directory / "metadata.json").read_text())
    assert "version" not in metadata  # what makes fo.types.FiftyOneDataset read the legacy layout
    assert metadata["media_type"] == "image" and metadata["info"]["classes"] == list(names)
    assert [sample["train_index"] for sample in samples] == [3, 10, 20]
    assert [sample["example_id"] for sample in samples] == [int(ids[3]), int(ids[10]), int(ids[20])]
    assert [sample["tags"] for sample in samples] == [["outlier"], ["mislabeled"], ["fine"]]
    assert [sample["note"] for sample in samples] == ["", "looks like a 4", "checked"]
    for sample, index in zip(samples, (3, 10, 20)):
        assert sample["ground_truth"] == {"_cls": "Classification", "label": names[int(train_set.y[index])]}
    assert samples[1]["suggested_label"] == {"_cls": "Classification", "label": names[4]}
    assert "suggested_label" not in samples[0] and "suggested_label" not in samples[2]
    for sample, index in zip(samples, (3, 10, 20)):
        assert not sample["filepath"].startswith("/") and sample["filepath"].startswith("data/")
        with Image.open(directory / sample["filepath"]) as image:
            np.testing.assert_array_equal(np.asarray(image), train_set.images[index])


def test_npy_scores_round_trip_with_a_sidecar_naming_rows_and_columns(run, scores, tmp_path):
    train_set, _ = run.datasets()
    written = save_scores(tmp_path / "scores.npy", scores, train_set)
    assert written == [tmp_path / "scores.npy", tmp_path / "scores.npy.json"] == [tmp_path / "scores.npy", sidecar_path(written[0])]
    loaded = np.load(written[0], allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, scores.values)
    sidecar = json.loads(written[1].read_text())
    assert sidecar["shape"] == [3, 60] and sidecar["file"] == "scores.npy"
    assert sidecar["train_ids"] == train_set.ids.tolist() and sidecar["train_labels"] == train_set.y.tolist()
    assert sidecar["query_names"] == scores.query_names and sidecar["query_indices"] == [4, 9, 11]
    assert sidecar["query_labels"] == [1, 7, 3] and sidecar["class_names"] == list(train_set.class_names)
    assert (sidecar["method"], sidecar["settings"], sidecar["checkpoints"], sidecar["key"]) == (
        "graddot", {"normalize": False}, [0], "abc123")


def test_csv_scores_hold_the_top_k_proponents_and_opponents_of_every_query(run, scores, tmp_path):
    train_set, _ = run.datasets()
    names = train_set.class_names
    (path,) = save_scores(tmp_path / "top.csv", scores, train_set, top=4)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    expected = []
    for query, (query_name, query_label) in enumerate(zip(["test 4", "test 9", "'=HYPERLINK(\"x\")"], [1, 7, 3])):
        for kind, order in (("proponent", np.argsort(-scores.values[query], kind="stable")),
                            ("opponent", np.argsort(scores.values[query], kind="stable"))):
            for rank, index in enumerate(order[:4], start=1):
                expected.append({"query": query_name, "query_label": names[query_label], "rank": str(rank), "kind": kind,
                                 "train_index": str(index), "train_id": str(train_set.ids[index]),
                                 "train_label": names[int(train_set.y[index])],
                                 "score": str(float(scores.values[query, index]))})
    assert rows == expected


def test_parquet_scores_are_a_long_table_of_every_query_and_training_example(run, scores, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    train_set, _ = run.datasets()
    (path,) = save_scores(tmp_path / "scores.parquet", scores, train_set)
    table = pd.read_parquet(path)
    assert list(table.columns) == ["query", "train_index", "train_id", "score"] and len(table) == 3 * 60
    found = {(row.query, row.train_index, row.train_id): row.score for row in table.itertuples()}
    assert found == {(name, m, int(train_id)): float(scores.values[q, m])
                     for q, name in enumerate(scores.query_names) for m, train_id in enumerate(train_set.ids)}


@pytest.mark.badinput
def test_an_unknown_score_suffix_names_the_three_types_and_writes_nothing(run, scores, tmp_path):
    train_set, _ = run.datasets()
    with pytest.raises(ExportError, match=r"unknown score file type '\.txt'; use \.npy .*\.parquet .*\.csv"):
        save_scores(tmp_path / "scores.txt", scores, train_set)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.badinput
def test_scores_of_another_training_set_or_an_unknown_flags_format_are_refused(run, scores, tmp_path):
    train_set, _ = run.datasets()
    scores.train_ids = scores.train_ids[::-1]
    with pytest.raises(ExportError, match="the scores' training ids differ from this training set's"):
        save_scores(tmp_path / "scores.npy", scores, train_set)
    with pytest.raises(ExportError, match="flags export format 'xml': choose one of csv, cleanlab, fiftyone"):
        export_flags(run, Annotations(tmp_path / "annotations.sqlite"), "xml", tmp_path / "flags.xml")
    assert not (tmp_path / "scores.npy").exists() and not (tmp_path / "flags.xml").exists()


@pytest.mark.badinput
def test_parquet_without_pyarrow_says_what_to_install_and_writes_nothing(run, scores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    train_set, _ = run.datasets()
    with pytest.raises(ExportError, match="writing .parquet needs pyarrow: pip install pyarrow"):
        save_scores(tmp_path / "scores.parquet", scores, train_set)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.badinput
def test_an_unwritable_folder_is_reported_and_leaves_no_file(run, scores, tmp_path, monkeypatch):
    train_set, _ = run.datasets()
    _fail_writes_after(monkeypatch, allowed=0)
    with pytest.raises(ExportError, match=f"cannot write {tmp_path / 'top.csv'}: Permission denied; choose a writable --out"):
        save_scores(tmp_path / "top.csv", scores, train_set)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.badinput
def test_a_sidecar_that_cannot_be_written_takes_its_matrix_away_too(run, scores, tmp_path, monkeypatch):
    train_set, _ = run.datasets()
    _fail_writes_after(monkeypatch, allowed=1)
    with pytest.raises(ExportError, match=f"cannot write {tmp_path / 'scores.npy.json'}: Permission denied"):
        save_scores(tmp_path / "scores.npy", scores, train_set)
    assert list(tmp_path.iterdir()) == []


def test_tdx_attribute_out_writes_the_scores_it_computed(run, tmp_path, capsys):
    root = str(run.workspace.root)
    tdx(["attribute", run.run_id, "--workspace", root, "--method", "graddot", "--queries", "0-2", "--out", str(tmp_path / "s.npy")])
    tdx(["attribute", run.run_id, "--workspace", root, "--method", "graddot", "--queries", "0-2",
         "--out", str(tmp_path / "s.csv"), "--out-top", "3"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 's.npy'}, {tmp_path / 's.npy.json'}" in out and f"wrote {tmp_path / 's.csv'}" in out
    expected = attribute(run, "graddot", queries=[0, 1, 2], device="cpu").values
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy", allow_pickle=False), expected)
    assert json.loads((tmp_path / "s.npy.json").read_text())["query_names"] == ["test 0", "test 1", "test 2"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert len(rows) == 3 * 2 * 3
    assert [float(row["score"]) for row in rows[:3]] == sorted(expected[0].tolist(), reverse=True)[:3]


@pytest.mark.badinput
def test_tdx_attribute_with_a_bad_out_fails_before_scoring(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        tdx(["attribute", run.run_id, "--workspace", str(run.workspace.root), "--method", "graddot", "--out", str(tmp_path / "s.txt")])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "tdx: error:" in captured.err and "unknown score file type '.txt'" in captured.err
    assert "graddot:" not in captured.out and list(tmp_path.iterdir()) == []


def test_tdx_flags_export_writes_csv_cleanlab_and_fiftyone(run, tmp_path, capsys):
    train_set, _ = run.datasets()
    annotations = Annotations(run.workspace.annotations_path)
    annotations.set_flag(run.run_id, int(train_set.ids[2]), "mislabeled", suggested_label=1, note="=1+1")
    annotations.set_flag(run.run_id, int(train_set.ids[7]), "ambiguous")
    root = str(run.workspace.root)
    for fmt, out, written in (("csv", tmp_path / "flags.csv", "flags.csv"), ("cleanlab", tmp_path / "issues.npy", "issues.npy, "
                              f"{tmp_path / 'issues.npy.json'}"), ("fiftyone", tmp_path / "fo", "fo")):
        tdx(["flags", "export", run.run_id, "--workspace", root, "--format", fmt, "--out", str(out)])
        assert f"wrote {tmp_path / written}: {fmt} export of the 2 verdicts on {run.run_id}" in capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "flags.csv").read_text())))
    assert [(row["train_index"], row["kind"], row["note"]) for row in rows] == [("2", "mislabeled", "'=1+1"), ("7", "ambiguous", "")]
    np.testing.assert_array_equal(np.flatnonzero(np.load(tmp_path / "issues.npy", allow_pickle=False)), [2])
    samples = json.loads((tmp_path / "fo" / "samples.json").read_text())["samples"]
    assert [(sample["train_index"], sample["tags"]) for sample in samples] == [(2, ["mislabeled"]), (7, ["ambiguous"])]


@pytest.mark.badinput
def test_tdx_flags_export_of_an_unknown_run_names_the_runs_there(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        tdx(["flags", "export", "nope", "--workspace", str(run.workspace.root), "--format", "csv", "--out", str(tmp_path / "f.csv")])
    assert exited.value.code == 2
    assert f"no run 'nope' in workspace {run.workspace.root}; runs: {run.run_id}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_export_names_an_example_by_its_training_index_id_given_and_suggested_label(run, scores, tmp_path):
    train_set, _ = run.datasets()
    ids, labels, names = train_set.ids, train_set.y.numpy(), train_set.class_names
    assert not np.array_equal(ids, np.arange(len(ids))), "the digits split: ids are not positions"
    annotations = Annotations(tmp_path / "annotations.sqlite")
    annotations.set_flag(run.run_id, int(ids[30]), "mislabeled", suggested_label=(int(labels[30]) + 1) % 10, note="a 7?")
    annotations.set_flag(run.run_id, int(ids[4]), "mislabeled")
    annotations.set_flag(run.run_id, int(ids[12]), "outlier")
    (flags_file,) = export_flags(run, annotations, "csv", tmp_path / "flags.csv")
    rows = list(csv.DictReader(io.StringIO(flags_file.read_text())))
    assert tuple(rows[0]) == FLAG_COLUMNS
    suggested = {30: (labels[30] + 1) % 10}
    assert [{name: row[name] for name in FLAG_COLUMNS[:8]} for row in rows] == [
        {"run_id": run.run_id, "train_index": str(index), "example_id": str(ids[index]), "kind": kind,
         "given_label": str(labels[index]), "given_class": names[labels[index]],
         "suggested_label": str(suggested[index]) if index in suggested else "",
         "suggested_class": names[suggested[index]] if index in suggested else ""}
        for index, kind in ((4, "mislabeled"), (12, "outlier"), (30, "mislabeled"))], "in training-set order, the page's #N"

    mask_file, mask_sidecar = export_flags(run, annotations, "cleanlab", tmp_path / "issues.npy")
    mask = np.load(mask_file, allow_pickle=False)
    described = json.loads(mask_sidecar.read_text())
    assert mask_sidecar == tmp_path / "issues.npy.json" and described["file"] == "issues.npy"
    for row in rows:  # the CSV joins the mask and its sidecar on train_index
        index = int(row["train_index"])
        assert mask[index] == (row["kind"] == "mislabeled")
        assert (described["example_id"][index], described["given_label"][index]) == (int(row["example_id"]), int(row["given_label"]))
        assert described["suggested_label"][index] == (int(row["suggested_label"]) if row["suggested_label"] else None)
    assert described["example_id"] == ids.tolist() and described["given_label"] == labels.tolist()
    assert described["class_names"] == list(names) and described["shape"] == [len(ids)]

    (directory,) = export_flags(run, annotations, "fiftyone", tmp_path / "fo")
    samples = {sample["train_index"]: sample for sample in json.loads((directory / "samples.json").read_text())["samples"]}
    for row in rows:
        sample = samples[int(row["train_index"])]
        assert (sample["example_id"], sample["ground_truth"]["label"]) == (int(row["example_id"]), row["given_class"])
        assert sample.get("suggested_label", {}).get("label", "") == row["suggested_class"]

    (top,) = save_scores(tmp_path / "top.csv", scores, train_set, top=5)
    for row in csv.DictReader(io.StringIO(top.read_text())):
        index = int(row["train_index"])
        assert (int(row["train_id"]), row["train_label"]) == (ids[index], names[labels[index]])
