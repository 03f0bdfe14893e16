"""The anchor libraries (traker, kronfluence) run on a run's own data, model and checkpoints.

Only benchmarks import this (the product never does); install the anchors with
`pip install -e .[bench]`. Every function returns scores in the project's convention
(positive = proponent of the query's correct-class margin).
"""
from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from attribution_core.runs.run import Run
from attribution_core.task import correct_class_margin


def traker_scores(run: Run, *, k: int = 1024, lambda_reg: float = 100.0, checkpoints: list[int] | None = None,
                  batch_size: int = 128) -> np.ndarray:
    """traker's TRAK scores (n_test, N) over the given checkpoints (default: the last five)."""
    from trak import TRAKer

    train_set, test_set = run.datasets()
    checkpoints = checkpoints or list(range(max(0, len(run.checkpoints) - 5), len(run.checkpoints)))
    states = [run.load_model(index).state_dict() for index in checkpoints]
    with tempfile.TemporaryDirectory(prefix="traker-") as directory:
        traker = TRAKer(model=run.load_model(-1), task="image_classification", train_set_size=len(train_set),
                        save_dir=directory, device="cpu", proj_dim=k, use_half_precision=False, lambda_reg=lambda_reg,
                        logging_level=logging.WARNING)
        for model_id, state in enumerate(states):
            traker.load_checkpoint(state, model_id=model_id)
            for start in range(0, len(train_set), batch_size):
                batch = [train_set.x[start : start + batch_size], train_set.y[start : start + batch_size]]
                traker.featurize(batch=batch, num_samples=len(batch[1]))
        traker.finalize_features()
        for model_id, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=state, model_id=model_id, num_targets=len(test_set))
            for start in range(0, len(test_set), batch_size):
                batch = [test_set.x[start : start + batch_size], test_set.y[start : start + batch_size]]
                traker.score(batch=batch, num_samples=len(batch[1]))
        return np.asarray(traker.finalize_scores(exp_name="test"), dtype=np.float32).T.copy()


def _kronfluence_task():
    from kronfluence.task import Task

    class MarginTask(Task):
        """Cross-entropy training loss; measurement = minus the correct-class margin (kronfluence minimises it)."""

        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return -correct_class_margin(model(inputs), labels).sum()

    return MarginTask()


def _kronfluence_analyzer(run: Run, directory: str, checkpoint: int, strategy: str):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    task = _kronfluence_task()
    model = prepare_model(run.load_model(checkpoint), task)
    analyzer = Analyzer(analysis_name="anchor", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=directory)
    train_set, _ = run.datasets()
    analyzer.fit_all_factors(factors_name=strategy, dataset=TensorDataset(train_set.x, train_set.y), per_device_batch_size=256,
                             factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
    return analyzer


def kronfluence_scores(run: Run, *, damping: float = 1e-3, checkpoint: int = -1, strategy: str = "ekfac") -> np.ndarray:
    """kronfluence's influence scores (n_test, N) at one checkpoint; positive = helpful = proponent."""
    from kronfluence.arguments import ScoreArguments

    train_set, test_set = run.datasets()
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as directory:
        analyzer = _kronfluence_analyzer(run, directory, checkpoint, strategy)
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name=strategy, query_dataset=TensorDataset(test_set.x, test_set.y),
            train_dataset=TensorDataset(train_set.x, train_set.y), per_device_query_batch_size=512,
            per_device_train_batch_size=512, score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("pairwise")["all_modules"].float().numpy()


def kronfluence_self_influence(run: Run, *, damping: float = 1e-3, checkpoint: int = -1, strategy: str = "ekfac") -> np.ndarray:
    """kronfluence's self-influence (N,) of the training set at one checkpoint."""
    from kronfluence.arguments import ScoreArguments

    train_set, _ = run.datasets()
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as directory:
        analyzer = _kronfluence_analyzer(run, directory, checkpoint, strategy)
        analyzer.compute_self_scores(
            scores_name="self", factors_name=strategy, train_dataset=TensorDataset(train_set.x, train_set.y),
            per_device_train_batch_size=512, score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        return analyzer.load_self_scores("self")["all_modules"].float().numpy()
