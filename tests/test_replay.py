"""Replay: the recorded run replays exactly, and its metagradients are the true derivative of retraining.

Checked against two independent computations on a tiny two-stage run (SGD with momentum and
weight decay on images with pixel noise, then Adam on rotated images of five classes): plain autograd through the whole
unrolled run, written out here with its own optimizer arithmetic, and central finite differences
of retraining with one example's weight moved by ±eps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from attribution_core import api
from attribution_core.data import DataSpec
from attribution_core.errors import DataError, SettingsError
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.models import ModelSpec, build_model
from attribution_core.runs.replay_engine import metagradients, replay_forward, replay_plan
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage
from attribution_core.runs.training import retrain, train
from attribution_core.store import Workspace, save_tensors

RECIPE = Recipe(
    (Stage(name="sgd", epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=16, transform="noise"),
     Stage(name="adam", epochs=3, lr=0.01, optimizer="adam", momentum=0.9, weight_decay=1e-3, batch_size=8,
           classes=(0, 1, 2, 3, 4), transform="rotate")),
    seed=4, checkpoints=CheckpointPolicy(every_epochs=1),
)
QUERIES = [0, 1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = DataSpec(source="digits", test_size=40, split_seed=0, max_train=60)
    return train(data, ModelSpec("mlp", {"hidden": [6]}), RECIPE, Workspace(tmp_path_factory.mktemp("ws")), "replay")


def unrolled_measurement(run, weights: torch.Tensor) -> torch.Tensor:
    """f_q(θ_T) (Q,) of training unrolled by hand in float64 from the seed's initial weights, differentiable in weights (N,)."""
    train_set, test_set = run.datasets()
    torch.manual_seed(run.recipe.seed)
    model = build_model(run.model, train_set.input_shape, train_set.n_classes).double()
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    record = run.record
    for step in range(1, record.n_steps + 1):
        stage = int(record.stage[step - 1])
        if step == 1 or record.stage[step - 2] != stage:
            first_moment = {name: torch.zeros_like(p) for name, p in params.items()}
            second_moment = {name: torch.zeros_like(p) for name, p in params.items()}
            count = 0
        rows = torch.as_tensor(record.batch(step))
        x, y = run.train_view(stage)[rows].double(), train_set.y[rows]
        logits = functional_call(model, params, (x,))
        loss = (weights[rows] * F.cross_entropy(logits, y, reduction="none")).sum() / len(rows)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        lr, beta1, decay = record.lr[step - 1], record.momentum[step - 1], record.weight_decay[step - 1]
        count += 1
        for name in params:
            g = grads[name] + decay * params[name]
            if record.optimizer[step - 1] == "sgd":
                first_moment[name] = beta1 * first_moment[name] + g
                params[name] = params[name] - lr * first_moment[name]
            else:
                beta2 = record.beta2[step - 1]
                first_moment[name] = beta1 * first_moment[name] + (1 - beta1) * g
                second_moment[name] = beta2 * second_moment[name] + (1 - beta2) * g * g
                corrected = first_moment[name] / (1 - beta1**count)
                root = torch.sqrt(second_moment[name] / (1 - beta2**count) + 1e-30)  # +1e-30: a finite derivative where v = 0
                params[name] = params[name] - lr * corrected / (root + 1e-8)
    logits = functional_call(model, params, (test_set.x[QUERIES].double(),))
    labels = test_set.y[QUERIES]
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    return correct - torch.logsumexp(logits.scatter(1, labels[:, None], float("-inf")), dim=1)


def test_replayed_weights_match_every_stored_checkpoint(run):
    plan = replay_plan(run)
    final, _ = replay_forward(plan, verify=True)  # raises if any checkpoint differs by more than 1e-5
    stored = dict(run.load_model(-1).named_parameters())
    assert max((final[n] - stored[n]).abs().max().item() for n in final) < 1e-5
    assert {step.stage for step in plan.steps} == {0, 1}  # through both stages


def test_the_order_keeping_retrain_with_nothing_removed_is_the_run(run):
    # The ground truth's retrain sees each stage's inputs as the trainer did (pixel noise drawn once per example, rotation).
    model = retrain(run, weights=np.ones(len(run.datasets()[0]), dtype=np.float32), order_keeping=True)
    stored = dict(run.load_model(-1).named_parameters())
    assert all(torch.equal(parameter, stored[name]) for name, parameter in model.named_parameters())  # the same function, bit for bit


def test_metagradients_equal_autograd_through_the_unrolled_run(run):
    weights = torch.ones(len(run.datasets()[0]), dtype=torch.float64, requires_grad=True)
    measurements = unrolled_measurement(run, weights)
    expected = torch.stack([torch.autograd.grad(value, weights, retain_graph=True)[0] for value in measurements])
    _, test_set = run.datasets()
    replayed = metagradients(replay_plan(run, dtype=torch.float64), test_set.x[QUERIES], test_set.y[QUERIES], stride=5)
    assert torch.allclose(replayed, expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item())


def test_metagradients_equal_central_differences_of_retraining(run):
    plan = replay_plan(run, dtype=torch.float64)
    _, test_set = run.datasets()
    x, y = test_set.x[QUERIES].double(), test_set.y[QUERIES]
    derivative = metagradients(plan, x, y)
    n, eps = len(plan.train_y), 1e-5

    def measured(weights):
        final, _ = replay_forward(plan, weights, verify=False)
        return plan.task.measurement(lambda inputs: functional_call(plan.model, final, (inputs,)), x, y)

    for example in (0, 17, 42):
        up, down = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        up[example], down[example] = 1 + eps, 1 - eps
        difference = (measured(up) - measured(down)) / (2 * eps)
        assert torch.allclose(derivative[:, example], difference, rtol=1e-5, atol=1e-8)


def test_a_window_from_stage_two_holds_the_first_stage_fixed(run):
    _, test_set = run.datasets()
    plan = replay_plan(run, start_stage=1, dtype=torch.float64)
    derivative = metagradients(plan, test_set.x[QUERIES], test_set.y[QUERIES])
    unseen = ~RECIPE.stages[1].members(run.datasets()[0].y.numpy())
    assert torch.all(derivative[:, torch.as_tensor(unseen)] == 0)  # only stage 2's draws count in the window
    whole = metagradients(replay_plan(run, dtype=torch.float64), test_set.x[QUERIES], test_set.y[QUERIES])
    assert not torch.allclose(whole, derivative)


def test_through_the_front_door_replay_is_a_method_whose_positive_scores_are_proponents(run):
    scores = api.attribute(run, "replay", queries=QUERIES, device="cpu")
    _, test_set = run.datasets()
    expected = metagradients(replay_plan(run), test_set.x[QUERIES], test_set.y[QUERIES])
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-4, atol=1e-6)
    # Removing the three strongest proponents of query 0 (weights 0, batch order kept) lowers its margin, as predicted.
    plan = replay_plan(run)
    top = np.argsort(-scores.values[0])[:3]
    weights = torch.ones(len(plan.train_y))
    weights[torch.as_tensor(top)] = 0
    final, _ = replay_forward(plan, weights, verify=False)
    before = plan.task.measurement(lambda x: functional_call(plan.model, replay_forward(plan, verify=False)[0], (x,)),
                                   test_set.x[:1], test_set.y[:1])
    after = plan.task.measurement(lambda x: functional_call(plan.model, final, (x,)), test_set.x[:1], test_set.y[:1])
    assert (after - before).item() < 0 and scores.values[0, top].sum() > 0


class Stop(Exception):
    """What a cancelled job's progress callback raises."""


def test_scores_report_every_replayed_step_and_a_raising_callback_stops_them_cleanly(run):
    settings, queries = {"query_block": 2, "stride": 3}, [3, 4, 5]  # two blocks; a state of its own (fitted here)
    n_steps, calls = run.record.n_steps, []
    scores = api.attribute(run, "replay", queries=queries, settings=settings, device="cpu",
                           progress=lambda done, total: calls.append((done, total)))
    assert [call for call in calls if call[1] == n_steps] == [(step, n_steps) for step in range(1, n_steps + 1)]  # the fit's replay
    assert [call for call in calls if call[1] != n_steps] == [(step, 2 * n_steps) for step in range(1, 2 * n_steps + 1)]  # two blocks
    _, test_set = run.datasets()
    expected = metagradients(replay_plan(run), test_set.x[queries], test_set.y[queries])
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-4, atol=1e-6 * np.abs(expected.numpy()).max())

    def cancel(done: int, total: int) -> None:
        if total == 2 * n_steps and done == n_steps + 3:  # three steps into the second block
            raise Stop

    threads = torch.get_num_threads()
    with pytest.raises(Stop):
        api.attribute(run, "replay", queries=[6, 7, 8], settings=settings, device="cpu", progress=cancel)
    assert api.stored_scores(run, "replay", queries=[6, 7, 8], settings=settings) is None
    assert torch.get_num_threads() == threads
    again = api.attribute(run, "replay", queries=[6, 7, 8], settings=settings, device="cpu")
    expected = metagradients(replay_plan(run), test_set.x[[6, 7, 8]], test_set.y[[6, 7, 8]])
    np.testing.assert_allclose(again.values, expected.numpy(), rtol=1e-4, atol=1e-6 * np.abs(expected.numpy()).max())


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """A smoother run for the quality floor: one SGD stage on 200 digits."""
    data = DataSpec(source="digits", test_size=40, split_seed=0, max_train=200)
    recipe = Recipe((Stage(epochs=2, lr=0.05, batch_size=32),), seed=0, checkpoints=CheckpointPolicy(every_epochs=1))
    return train(data, ModelSpec("mlp", {"hidden": [16]}), recipe, Workspace(tmp_path_factory.mktemp("sgd")), "sgd")


def test_order_keeping_ground_truth_replays_each_subset_and_replay_predicts_it(sgd_run):
    settings = LdsSettings(n_subsets=10, alpha=0.95, mode="order_keeping")
    truth = groundtruth(sgd_run, settings)
    plan = replay_plan(sgd_run)
    _, test_set = sgd_run.datasets()
    final, _ = replay_forward(plan, torch.as_tensor(truth.masks[2], dtype=torch.float32), verify=False)
    with torch.no_grad():
        expected = plan.task.measurement(lambda x: functional_call(plan.model, final, (x,)), test_set.x, test_set.y)
    np.testing.assert_allclose(truth.margins[2], expected.numpy(), rtol=1e-5, atol=1e-5)
    replay = lds(api.attribute(sgd_run, "replay", device="cpu"), truth).mean
    tracin = lds(api.attribute(sgd_run, "tracin", device="cpu"), truth).mean
    assert replay > 0.9 and replay > tracin  # a quality floor: a sign flip or a lost step would fail it


@pytest.mark.badinput
def test_a_run_that_does_not_replay_names_the_step(run, tmp_path):
    import shutil

    from attribution_core.runs.run import load_run

    shutil.copytree(run.workspace.root, tmp_path / "ws")
    copy = load_run(tmp_path / "ws", run.run_id)
    info = copy.checkpoints[1]
    state = {name: tensor + 0.01 for name, tensor in copy.load_model(1).state_dict().items()}
    save_tensors(copy.directory / "checkpoints" / info.file, state)
    with pytest.raises(DataError, match=f"after step {info.step} the replayed weights differ from the stored checkpoint"):
        replay_forward(replay_plan(copy))


@pytest.mark.badinput
def test_runs_replay_cannot_attribute_say_why():
    from attribution_core.methods.replay import ReplaySettings

    with pytest.raises(SettingsError, match="at_weight"):
        ReplaySettings(at_weight=-1)


def test_the_smoothness_check_compares_first_order_predictions_with_order_keeping_retrains(sgd_run):
    from attribution_core.evaluation.smoothness import SmoothnessSettings, smoothness_check

    scores = api.attribute(sgd_run, "replay", queries=[5], device="cpu")
    result = smoothness_check(sgd_run, scores, 5, SmoothnessSettings(n_removals=4, fraction=0.05))
    assert len(result.removed) == 4 and all(len(removed) == 10 for removed in result.removed)
    plan = replay_plan(sgd_run)
    _, test_set = sgd_run.datasets()
    weights = torch.ones(len(plan.train_y))
    weights[torch.as_tensor(result.removed[0])] = 0

    def measured(w):
        final, _ = replay_forward(plan, w, verify=False)
        return plan.task.measurement(lambda x: functional_call(plan.model, final, (x,)), test_set.x[5:6], test_set.y[5:6]).item()

    assert result.actual[0] == pytest.approx(measured(weights) - measured(None), abs=1e-6)
    assert result.predicted[0] == pytest.approx(-scores.values[0, result.removed[0]].sum(), rel=1e-6)
    # Exact derivatives on a smooth run: removals of 5 % move the margin as predicted (at 1 %, ReLU kinks already show).
    assert np.corrcoef(result.predicted, result.actual)[0, 1] > 0.9


def test_the_smoothness_check_is_stored_and_read_back_without_replaying(sgd_run, monkeypatch):
    from attribution_core.evaluation import smoothness as module

    assert module.stored_smoothness(sgd_run, 5, "replay", checkpoints=[1]) is None
    first = module.smoothness(sgd_run, 5, "replay", checkpoints=[1])
    monkeypatch.setattr(module, "smoothness_check", lambda *args, **kwargs: pytest.fail("the stored check was computed again"))
    assert (module.smoothness(sgd_run, 5, "replay", checkpoints=[1]) == first
            == module.stored_smoothness(sgd_run, 5, "replay", checkpoints=[1]))
    assert len(first.predicted) == len(first.actual) == module.SmoothnessSettings().n_removals
