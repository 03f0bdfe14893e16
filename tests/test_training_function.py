"""A user's loop as a training function: recorded once, retrained bit for bit, replayed exactly through BatchNorm,
augmentation and dropout; bad functions and untrusted code get a clear message."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn
from torch.nn import functional as F

from attribution_core.api import AUGMENTED_NOTE, attribute
from attribution_core.data import DataSpec
from attribution_core.errors import DataError, SettingsError
from attribution_core.evaluation.counterfactual import CounterfactualSettings, counterfactual, query_outcome
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.methods import METHODS
from attribution_core.runs.capabilities import capabilities
from attribution_core.runs.recorder import Recorder, RecorderSettings, factory_name
from attribution_core.runs.replay_engine import metagradients, replay_forward, replay_plan
from attribution_core.runs.run import Run, load_run
from attribution_core.runs.session import Batch, TrainingFunctionError, TrainingSession, seeded_global_rng, step_seed
from attribution_core.runs.threads import one_thread
from attribution_core.runs.training import initial_model, record_run, retrain
from attribution_core.store import Workspace
from attribution_core.task import Task
from attribution_core.trust import UntrustedCodeError, trust

ROOT = Path(__file__).resolve().parent.parent
DIGITS = DataSpec(source="digits", test_size=60, max_train=120)
BATCH = 32
SMALL = {"trak": {"k": 64}, "source": {"n_segments": 1}}
"""Settings that keep each method quick on these runs (SOURCE: the runs have 2 checkpoints, fewer than its 3 segments)."""


def bn_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A small BatchNorm CNN with dropout, as users write them."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(4 * height * width, n_classes))


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips drawn from the step's generator."""
    chosen = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(chosen[:, None, None, None], x.flip(-1), x)


def loop(session: TrainingSession) -> None:
    """Nesterov SGD with a decaying lr, flips, dropout and BatchNorm: the user's loop, written once."""
    model = session.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    model.train()
    for _ in range(int(session.options.get("epochs", 2))):
        for batch in session.batches(BATCH, augment=flip):
            losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
            optimizer.zero_grad()
            batch.loss(losses).backward()
            optimizer.step()
            session.step(optimizer, batch, losses)
            scheduler.step()
        session.checkpoint()


def loop_ignoring_weights(session: TrainingSession) -> None:
    """A loop that reads the weights but takes the plain mean: removing an example changes nothing."""
    model = session.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in session.batches(BATCH):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        optimizer.zero_grad()
        _ = batch.weights
        losses.mean().backward()
        optimizer.step()
        session.step(optimizer, batch, losses)


def loop_with_its_own_noise(session: TrainingSession) -> None:
    """A loop that adds noise from a generator of its own (seeded, so retraining repeats it; replay cannot know it)."""
    model, noise = session.model, torch.Generator().manual_seed(123)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for batch in session.batches(BATCH):
        x = batch.x + 0.1 * torch.randn(batch.x.shape, generator=noise)
        losses = F.cross_entropy(model(x), batch.y, reduction="none")
        optimizer.zero_grad()
        batch.loss(losses).backward()
        optimizer.step()
        session.step(optimizer, batch, losses)
    session.checkpoint()


def loop_that_raises(session: TrainingSession) -> None:
    """A loop with a bug."""
    raise ValueError("the loop's own bug")


def loop_with_two_groups(session: TrainingSession) -> None:
    """Parameter groups with their own learning rates (the record keeps the first group's)."""
    model = session.model
    first, *rest = list(model.parameters())
    optimizer = torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": rest, "lr": 0.01}])
    for batch in session.batches(BATCH):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        optimizer.zero_grad()
        batch.loss(losses).backward()
        optimizer.step()
        session.step(optimizer, batch, losses)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("function_ws"))


@pytest.fixture(scope="module")
def run(workspace) -> Run:
    return record_run(workspace, "bn-loop", loop, data=DIGITS, model=factory_name(bn_cnn), seed=5)


def _equal(first: nn.Module, second: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# --- recording and retraining ---------------------------------------------------------------------------------------


def test_the_run_names_its_function_its_augmentation_and_its_optimizer(run):
    assert run.trained_by.function.endswith("test_training_function:loop")  # as pytest imports this module
    assert run.trained_by.augment == ((1, run.trained_by.function.replace(":loop", ":flip")),)
    assert run.trained_by.optimizer_starts == (1,) and run.trained_by.not_replayable == ()
    assert run.record.n_steps == 2 * math.ceil(120 / BATCH) and bool(run.record.nesterov.all())
    assert len(run.checkpoints) == 2 and run.origin == "trained"


@pytest.fixture(scope="module")
def by_hand(run, workspace) -> Run:
    """The same loop written out by hand around a Recorder, drawing exactly what the session draws."""
    model = initial_model(run.model, run.datasets()[0], seed=5)
    with Recorder(workspace, "bn-by-hand", model=model, factory=bn_cnn, data=DIGITS, seed=5,
                  settings=RecorderSettings(margins_from_losses=True)) as recorder:
        x, y = recorder.train_set.x, recorder.train_set.y
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        order, step = torch.Generator().manual_seed(5), 0
        with one_thread(), seeded_global_rng(step_seed(5, 0, "function")):  # as the session: sums independent of the thread count
            model.train()
            for _ in range(2):
                for rows in torch.randperm(len(x), generator=order).split(BATCH):
                    step += 1
                    with seeded_global_rng(step_seed(5, step, "dropout")):
                        inputs = flip(x[rows], torch.Generator().manual_seed(step_seed(5, step, "augment")))
                        losses = F.cross_entropy(model(inputs), y[rows], reduction="none")
                        optimizer.zero_grad()
                        losses.mean().backward()
                        optimizer.step()
                    recorder.step(optimizer, rows, losses=losses)
                    scheduler.step()
                recorder.checkpoint()
    return load_run(workspace, "bn-by-hand")


def test_the_function_form_and_the_recorder_form_of_one_loop_record_the_same_run(run, by_hand):
    assert np.array_equal(by_hand.record.indices, run.record.indices) and np.array_equal(by_hand.record.lr, run.record.lr)
    assert np.array_equal(by_hand.record.losses, run.record.losses)
    assert all(_equal(by_hand.load_model(index), run.load_model(index)) for index in range(len(run.checkpoints)))
    assert by_hand.training_function() is None and run.training_function() is not None  # only the function form is retrained


def test_a_retrain_with_nothing_removed_and_the_runs_seed_is_the_run_bit_for_bit(run):
    assert _equal(retrain(run), run.load_model(-1))
    assert _equal(retrain(run, weights=np.ones(120, dtype=np.float32), order_keeping=True), run.load_model(-1))
    assert not _equal(retrain(run, seed=6), run.load_model(-1))


def test_a_reshuffled_retrain_draws_only_the_kept_rows(run, monkeypatch):
    keep = np.ones(120, dtype=bool)
    keep[::3] = False
    drawn = []
    original = TrainingSession.step

    def noting(self, optimizer, batch: Batch, losses=None, margins=None):
        drawn.append(batch.rows.clone())
        return original(self, optimizer, batch, losses, margins)

    monkeypatch.setattr(TrainingSession, "step", noting)
    retrain(run, keep)
    rows = torch.cat(drawn).numpy()
    assert set(rows) == set(np.flatnonzero(keep)) and len(rows) == 2 * keep.sum()  # every kept row once an epoch, no other


def test_an_order_keeping_retrain_keeps_every_recorded_slot_and_weighs_removed_rows_zero(run, monkeypatch):
    weights = np.ones(120, dtype=np.float32)
    weights[[3, 50]] = 0
    seen = []
    original = TrainingSession.step

    def noting(self, optimizer, batch: Batch, losses=None, margins=None):
        seen.append((batch.rows.clone(), batch.weights.clone()))
        return original(self, optimizer, batch, losses, margins)

    monkeypatch.setattr(TrainingSession, "step", noting)
    model = retrain(run, weights=weights, order_keeping=True)
    assert np.array_equal(torch.cat([rows for rows, _ in seen]).numpy(), run.record.indices)
    zeroed = torch.cat([rows[w == 0] for rows, w in seen]).numpy()
    assert set(zeroed) == {3, 50} and not _equal(model, run.load_model(-1))


# --- replay ----------------------------------------------------------------------------------------------------------


def test_replay_reproduces_every_checkpoint_through_batchnorm_augmentation_and_dropout(run):
    plan = replay_plan(run)
    final, _ = replay_forward(plan, verify=True)  # raises if a checkpoint (weights and running statistics) differs by > 1e-5
    stored = run.load_model(-1).state_dict()
    assert max((final[name] - stored[name]).abs().max().item() for name in stored if stored[name].is_floating_point()) < 1e-5
    assert any("running_var" in name for name in final)


def test_replays_derivative_is_a_finite_difference_of_the_order_keeping_retrain(run):
    # The order-keeping retrain (the loop itself, float32) with one example's weight moved by ±ε, against replay's derivative;
    # and replay's own order-keeping map in float64, where the central difference agrees to rounding.
    _, test_set = run.datasets()
    x, label, task = test_set.x[:1], int(test_set.y[0]), Task()
    plan = replay_plan(run, dtype=torch.float64)
    derivative = metagradients(plan, test_set.x[:1], test_set.y[:1])[0]

    def by_retrain(weights: np.ndarray) -> float:
        return query_outcome(retrain(run, weights=weights.astype(np.float32), order_keeping=True, task=task), task, x, label)[0]

    def by_replay(weights: np.ndarray) -> float:
        final, _ = replay_forward(plan, torch.as_tensor(weights), verify=False)
        params = {name: value for name, value in final.items() if name in plan.initial}
        with torch.no_grad():
            return float(plan.measure(params, {name: final[name] for name in plan.initial_buffers}, x.double(), test_set.y[:1])[0])

    # float32 margins move in steps of about 1.2e-7, so a central difference over ±1e-4 resolves about 1e-3
    for example in (int(derivative.abs().argmax()), 11):
        for measured, epsilon, rel, absolute in ((by_retrain, 1e-4, 1e-2, 2e-3), (by_replay, 1e-5, 1e-5, 1e-8)):
            up, down = np.ones(120), np.ones(120)
            up[example], down[example] = 1 + epsilon, 1 - epsilon
            difference = (measured(up) - measured(down)) / (2 * epsilon)
            assert difference == pytest.approx(float(derivative[example]), rel=rel, abs=absolute)


def test_replay_attributes_the_run_through_the_front_door(run):
    scores = attribute(run, "replay", queries=[0, 1], device="cpu")
    assert scores.values.shape == (2, 120) and np.isfinite(scores.values).all()
    assert AUGMENTED_NOTE in scores.notes  # the page says the loop's flips are not what examples are scored on
    assert METHODS["replay"].unsupported_reason(run) is None


# --- what the evaluations retrain -------------------------------------------------------------------------------------


def test_the_lds_ground_truth_and_the_counterfactual_retrain_the_runs_function(run):
    truth = groundtruth(run, LdsSettings(n_subsets=4, seed=1))
    keep = truth.masks[0]
    expected = query_outcome(retrain(run, keep), Task(), run.datasets()[1].x[:1], int(run.datasets()[1].y[0]))[0]
    assert truth.margins[0, 0] == pytest.approx(expected, abs=1e-6)
    result = lds(attribute(run, "trak", queries=[0, 1, 2], settings={"k": 32}), truth)
    assert result.predicted.shape == (3, 4)
    check = counterfactual(run, 0, "trak", settings=CounterfactualSettings(k=10, n_random=1), method_settings={"k": 32})
    assert set(check.margins) == {"proponents", "opponents", "random_0"}


def test_capabilities_say_what_a_run_supports_and_why_not(run, by_hand):
    assert all(capability.supported for capability in capabilities(run).values())
    recorded = capabilities(by_hand)
    assert not any(capability.supported for capability in recorded.values())
    assert all("training function" in capability.reason and "tdx record" in capability.reason for capability in recorded.values())


# --- the example: your own loop as a training function, opened in every method and in the app ---------------------


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> Run:
    """examples/own_training_loop.py run on its tiny setting, as a user would run it."""
    root = tmp_path_factory.mktemp("example_ws")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_training_loop.py"), "--tiny", "--workspace", str(root)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert f"tdx app --workspace {root} --port 8501" in result.stdout and "http://127.0.0.1:8501/?run=own-loop-cnn" in result.stdout
    if str(ROOT) not in sys.path:  # the factory is examples.own_training_loop:small_cnn, found from the repository root as the app does
        sys.path.insert(0, str(ROOT))
    return load_run(root, "own-loop-cnn")


@pytest.mark.slow
def test_the_example_records_a_batchnorm_cnn_with_augmentation_and_dropout_that_names_its_loop(example_run):
    assert example_run.model.name == "examples.own_training_loop:small_cnn"
    assert example_run.trained_by.function == "examples.own_training_loop:train"
    assert example_run.trained_by.augment == ((1, "examples.own_training_loop:augment"),)
    assert example_run.data == DataSpec(source="sample", max_train=200, max_test=100)
    assert len(example_run.checkpoints) == 2 and example_run.record.n_steps == 2 * math.ceil(200 / 64)
    assert bool(example_run.record.nesterov.all()) and len(set(example_run.record.lr.tolist())) > 2  # warm-up, then cosine
    assert np.isfinite(example_run.record.losses).all() and np.isfinite(example_run.record.margins).all()  # from the loop's losses


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_attributes_the_example_run(example_run, method):
    reason = METHODS[method].unsupported_reason(example_run)
    if reason is not None:
        assert method == "exact_if"  # the one method the example's parameters are too many for
        pytest.skip(reason)
    scores = attribute(example_run, method, queries=[0, 1], settings=SMALL.get(method), device="cpu")
    assert scores.values.shape == (2, 200) and np.isfinite(scores.values).all()


@pytest.mark.slow
def test_tdx_attributes_the_example_run_from_the_repository_root(example_run):
    # the console script's sys.path starts at its bin folder: the factory "examples...." is found only as `python -m` finds it
    result = subprocess.run([str(Path(sys.executable).parent / "tdx"), "attribute", example_run.run_id, "--workspace",
                             str(example_run.workspace.root), "--method", "tracin", "--queries", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert "tracin" in result.stdout.lower()


@pytest.mark.slow
def test_the_app_opens_the_example_run(example_run, monkeypatch):
    monkeypatch.setenv("TDX_WORKSPACE", str(example_run.workspace.root))
    app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    app.query_params.update(run=example_run.run_id)
    app.run()
    assert not app.exception, [exception.message for exception in app.exception]
    assert app.selectbox(key="run").value == example_run.run_id
    app.switch_page("views/runs.py").run()
    assert not app.exception, [exception.message for exception in app.exception]


@pytest.mark.slow
def test_the_app_shows_what_a_recorded_loop_cannot_do_disabled_with_the_reason_before_any_click(by_hand, workspace, monkeypatch):
    # A run of its own: the module's run stores a ground truth by now, which Compare shows instead of the button.
    untouched = record_run(workspace, "bn-loop-untouched", loop, data=DIGITS, model=factory_name(bn_cnn), seed=5)
    monkeypatch.setenv("TDX_WORKSPACE", str(by_hand.workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")  # the page computes its scores itself: no worker in this test
    for run_id, can in ((by_hand.run_id, False), (untouched.run_id, True)):
        app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
        app.query_params.update(run=run_id, method="trak")  # a method that estimates removal: Explore offers the smoothness check
        app.run()
        app.switch_page("views/compare.py").run()
        assert not app.exception, [exception.message for exception in app.exception]
        assert app.button(key="lds_compute").disabled is not can
        assert any("cannot retrain it on subsets" in warning.value for warning in app.warning) is not can
        app.switch_page("views/explore.py").run()
        assert app.button(key="counterfactual_run").disabled is not can and app.button(key="smoothness_run").disabled is not can


# --- bad functions ---------------------------------------------------------------------------------------------------


@pytest.mark.badinput
def test_a_function_that_ignores_the_weights_is_detected(workspace):
    ignoring = record_run(workspace, "ignores", loop_ignoring_weights, data=DIGITS, model=factory_name(bn_cnn))
    weights = np.ones(120, dtype=np.float32)
    weights[ignoring.record.batch(1)[0]] = 0
    with pytest.raises(SettingsError, match="ignores the session's example weights"):
        retrain(ignoring, weights=weights, order_keeping=True)


@pytest.mark.badinput
def test_randomness_drawn_outside_the_session_makes_replay_refuse(workspace):
    noisy = record_run(workspace, "own-noise", loop_with_its_own_noise, data=DIGITS, model=factory_name(bn_cnn))
    assert _equal(retrain(noisy), noisy.load_model(-1))  # seeded: retraining still repeats it
    with pytest.raises(DataError, match="randomness drawn outside the training session"):
        replay_forward(replay_plan(noisy), verify=True)
    with pytest.raises(DataError, match="does not replay"):
        attribute(noisy, "replay", queries=[0])


@pytest.mark.badinput
def test_parameter_groups_of_their_own_are_named_before_any_replay(workspace):
    grouped = record_run(workspace, "groups", loop_with_two_groups, data=DIGITS, model=factory_name(bn_cnn))
    assert "parameter groups" in METHODS["replay"].unsupported_reason(grouped)
    assert capabilities(grouped)["retrain"].reason is None


@pytest.mark.badinput
def test_a_function_that_raises_leaves_an_incomplete_run_saying_why(workspace, capsys):
    with pytest.raises(TrainingFunctionError, match="loop_that_raises raised ValueError: the loop's own bug") as raised:
        record_run(workspace, "raises", loop_that_raises, data=DIGITS, model=factory_name(bn_cnn))
    assert isinstance(raised.value.__cause__, ValueError) and "Traceback" in capsys.readouterr().err
    assert "raises" not in workspace.run_ids()
    assert "ValueError: the loop's own bug" in (workspace.run_dir("raises", must_exist=False) / "incomplete.json").read_text()


@pytest.mark.badinput
def test_a_function_that_raises_in_a_job_fails_it_with_one_line_and_its_traceback_in_the_log(workspace, run, monkeypatch, capsys):
    from attribution_core.jobs.kinds import groundtruth_job
    from attribution_core.jobs.queue import FAILED, JobQueue
    from attribution_core.jobs.worker import work

    monkeypatch.setattr(sys.modules[loop.__module__], "loop", loop_that_raises)  # the run's function, broken since it was recorded
    queue = JobQueue(workspace.root)
    job = queue.submit(groundtruth_job(run, LdsSettings(n_subsets=2, seed=9)))
    work(workspace.root, "background", idle_exit=None, until_empty=True)
    failed = queue.get(job.key)
    assert failed.state == FAILED and "\n" not in failed.error and "raised ValueError: the loop's own bug" in failed.error
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.badinput
@pytest.mark.parametrize(("path", "message"), [
    ("no_such_module_anywhere:train", "does not import"),
    ("tests.test_training_function:no_such_function", "does not import"),
    ("tests.test_training_function", "'package.module:function'"),
])
def test_a_function_path_that_does_not_import_is_named_and_nothing_is_written(tmp_path, path, message):
    with pytest.raises(SettingsError, match=message):
        record_run(tmp_path, "bad-path", path, data=DIGITS, model=factory_name(bn_cnn))
    assert not (tmp_path / "runs").exists()


# --- consent before a run's code is imported ---------------------------------------------------------------------------


STRANGERS_LOOP = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.nn import functional as F

    def factory(input_shape, n_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes))

    def train(session):
        optimizer = torch.optim.SGD(session.model.parameters(), lr=0.1)
        for batch in session.batches(40):
            losses = F.cross_entropy(session.model(batch.x), batch.y, reduction="none")
            optimizer.zero_grad()
            batch.loss(losses).backward()
            optimizer.step()
            session.step(optimizer, batch, losses)
        session.checkpoint()
''')
"""Someone else's loop, in a module outside the project and the installed packages."""


@pytest.fixture
def strangers_run(tmp_path, monkeypatch) -> Run:
    """A run recorded with someone else's code, then opened by another user (another consent folder), nothing imported yet."""
    package = tmp_path / "their_code"
    package.mkdir()
    (package / "strangers_loop.py").write_text(STRANGERS_LOOP)
    monkeypatch.syspath_prepend(str(package))
    workspace = Workspace(tmp_path / "ws")
    record_run(workspace, "theirs", "strangers_loop:train", data=DIGITS, model="strangers_loop:factory")
    monkeypatch.setenv("TDX_CONFIG_DIR", str(tmp_path / "another_users_config"))
    monkeypatch.delitem(sys.modules, "strangers_loop")
    return load_run(workspace, "theirs")


@pytest.mark.badinput
def test_a_run_naming_code_the_user_has_not_trusted_imports_nothing_before_consent(strangers_run):
    with pytest.raises(UntrustedCodeError, match=r"strangers_loop \(from .*strangers_loop.py\).*tdx trust theirs"):
        strangers_run.load_model(-1)
    with pytest.raises(UntrustedCodeError):
        retrain(strangers_run)
    assert "strangers_loop" not in sys.modules  # nothing was imported
    trust(strangers_run.code(), strangers_run.workspace.root)
    assert strangers_run.load_model(-1) is not None and "strangers_loop" in sys.modules


@pytest.mark.badinput
def test_the_app_lists_untrusted_code_and_opens_the_run_only_after_consent(strangers_run, monkeypatch):
    monkeypatch.setenv("TDX_WORKSPACE", str(strangers_run.workspace.root))
    app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    app.query_params.update(run="theirs")
    app.run()
    assert not app.exception, [exception.message for exception in app.exception]
    assert any("imports code that is neither installed nor part of tda-explorer" in warning.value for warning in app.warning)
    assert list(app.dataframe[0].value["module"]) == ["strangers_loop"] and "strangers_loop" not in sys.modules
    app.button(key="trust_code").click().run()
    assert not any("imports code" in warning.value for warning in app.warning)
    assert "strangers_loop" in sys.modules  # the page went on to open the run


@pytest.mark.slow
def test_tdx_record_records_a_function_and_tdx_lds_retrains_it(tmp_path):
    command = [sys.executable, "-m", "attribution_core.cli"]
    environment = {**os.environ, "PYTHONPATH": ""}
    recorded = subprocess.run([*command, "record", "examples.own_training_loop:train", "cli-run", "--model",
                               "examples.own_training_loop:small_cnn", "--data", "sample", "--max-train", "150", "--max-test", "40",
                               "--set", "epochs=1", "--workspace", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=environment)
    assert recorded.returncode == 0, recorded.stderr
    run = load_run(tmp_path, "cli-run")
    assert run.trained_by.function == "examples.own_training_loop:train" and run.trained_by.options == {"epochs": 1}
    result = subprocess.run([*command, "lds", "cli-run", "--subsets", "3", "--methods", "graddot", "--workspace", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert "LDS" in result.stdout
