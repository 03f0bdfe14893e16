"""The `tdx` command's help and defaults: every option explained with its default, the app's defaults, a table with a header."""
from __future__ import annotations

import argparse
import re
import shutil

import numpy as np
import pytest
import torch

from attribution_core import cli
from attribution_core.cli import main as tdx
from attribution_core.data import Dataset
from attribution_core.errors import SettingsError
from attribution_core.evaluation.mislabel import default_ranking
from attribution_core.jobs.ready import default_method
from attribution_core.methods import METHODS
from attribution_core.runs.run import list_runs, load_run
from attribution_core.store import Workspace


def subcommands(parser: argparse.ArgumentParser, prefix: str = "tdx") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its full name ("tdx flags export"), nested ones included."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                found |= subcommands(sub, f"{prefix} {name}")
    return found


def help_text(name: str, monkeypatch) -> str:
    """What `<name> --help` prints on a terminal wide enough that no line is wrapped."""
    monkeypatch.setenv("COLUMNS", "10000")
    return subcommands(cli.build_parser())[name].format_help()


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    missing_help, missing_default = [], []
    for name, parser in subcommands(cli.build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing_help.append(label)
                continue
            shown = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
            optional = action.option_strings and not action.required and action.default is not False  # a flag is off unless given
            takes_default = optional or (action.nargs == "?" and action.default is not None)
            if takes_default and "default" not in shown:
                missing_default.append(label)
    assert missing_help == [] and missing_default == []


def test_method_help_names_every_method_without_nesting_a_labels_own_parenthesis(monkeypatch):
    text = help_text("tdx attribute", monkeypatch)
    assert all(f"{name}: {method.label}" in text for name, method in METHODS.items())
    assert "replay: replay (exact)" in text and "(replay (exact))" not in text


def test_queries_help_says_the_default_is_the_whole_test_set_and_what_that_costs(monkeypatch):
    text = help_text("tdx attribute", monkeypatch)
    assert "default: the whole test set" in text and "minutes on a CPU for thousands of queries" in text


def test_runs_prints_a_header_naming_its_columns_then_one_aligned_row_per_run(demo_workspace, capsys):
    tdx(["runs", "--workspace", str(demo_workspace.root)])
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["run", "model", "data", "stages", "test acc", "checkpoints"]
    runs = list_runs(demo_workspace)
    rows = [re.split(r"\s{2,}", line) for line in lines[1:]]
    assert [row[0] for row in rows] == [run.run_id for run in runs]
    two_stage = rows[[run.run_id for run in runs].index("fmnist-two-stage")]
    assert two_stage[1:4] == ["mlp", "sample", "pretrain → finetune"] and two_stage[5] == "6"
    columns = [lines[0].index(title) for title in ("model", "data", "stages", "test acc", "checkpoints")]
    assert all(line[column - 2 : column] == "  " for line in lines for column in columns), "every column starts where its title does"


@pytest.fixture
def workspace(demo_workspace, tmp_path) -> Workspace:
    """A private copy of the tiny demo (the commands store what they compute)."""
    shutil.copytree(demo_workspace.root, tmp_path / "workspace")
    return Workspace(tmp_path / "workspace")


def printed_suspects(capsys) -> list[str]:
    """The suspect lines `tdx mislabels` printed (one per example: '#index label ...', as the app names it)."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]


def test_mislabels_ranks_by_the_runs_default_ranking_as_the_app_opens_with(workspace, capsys, monkeypatch):
    root = str(workspace.root)
    assert default_ranking(load_run(workspace, "fmnist-noisy")) == ("dynamics", None)
    tdx(["mislabels", "fmnist-noisy", "--workspace", root, "--top", "5"])
    by_default = printed_suspects(capsys)
    tdx(["mislabels", "fmnist-noisy", "--workspace", root, "--top", "5", "--ranking", "dynamics"])
    assert by_default == printed_suspects(capsys) and len(by_default) == 5
    # a run without a record falls back, and says why, as on the Mislabels page (tests/test_mislabel.py checks the reason)
    monkeypatch.setattr("attribution_core.evaluation.mislabel.default_ranking", lambda run: ("loss_avg", "no record here."))
    tdx(["mislabels", "fmnist-noisy", "--workspace", root, "--top", "5"])
    output = capsys.readouterr().out
    assert output.startswith("note: no record here.\n")
    tdx(["mislabels", "fmnist-noisy", "--workspace", root, "--top", "5", "--ranking", "loss_avg"])
    assert [line for line in output.splitlines() if line.startswith("#")] == printed_suspects(capsys) != by_default


def test_attribute_and_counterfactual_use_the_runs_default_method_as_the_app_opens_with(workspace, capsys, monkeypatch):
    run = load_run(workspace, "fmnist-mlp")
    assert default_method(run) == "trak"
    monkeypatch.setattr("attribution_core.jobs.ready.default_method", lambda run_: "graddot")  # a run whose default is another
    tdx(["attribute", "fmnist-mlp", "--workspace", str(workspace.root), "--queries", "0-1"])
    assert capsys.readouterr().out.startswith("graddot: 2 queries x 600 training examples")
    asked = []

    def counterfactual(run_, query, method, **options):
        asked.append(method)
        raise SettingsError("no retraining in this test")

    monkeypatch.setattr("attribution_core.evaluation.counterfactual.counterfactual", counterfactual)
    with pytest.raises(SystemExit):
        tdx(["counterfactual", "fmnist-mlp", "3", "--workspace", str(workspace.root)])
    assert asked == ["graddot"]


def test_examples_are_named_by_the_pages_index_with_the_dataset_id_beside_it_where_they_differ():
    dataset = Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), ("a",), np.zeros((2, 1, 1)), np.array([11140, 1]))
    assert [cli.example_name(dataset, index) for index in range(2)] == ["#0 (id 11140)", "#1"]
