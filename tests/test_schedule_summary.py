"""schedule_summary: what a training record says a stretch of training ran with (optimizer, warm-up, peak, decay shape)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attribution_core.errors import DataError
from attribution_core.runs.record import TrainingRecord, schedule_summary


def record_of(lr: list[float], *, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4) -> TrainingRecord:
    """A record of len(lr) one-example steps with these learning rates and one optimizer's settings."""
    steps = len(lr)
    return TrainingRecord(stage=np.zeros(steps, dtype=np.int64), lr=np.asarray(lr, dtype=np.float64),
                          momentum=np.full(steps, momentum), beta2=np.zeros(steps), weight_decay=np.full(steps, weight_decay),
                          batch_size=np.ones(steps, dtype=np.int64), optimizer=[optimizer] * steps,
                          indices=np.zeros(steps, dtype=np.int64), losses=np.zeros(steps, dtype=np.float32),
                          margins=np.zeros(steps, dtype=np.float32))


def scheduled(scheduler, steps: int, lr: float = 0.1) -> list[float]:
    """The lr each of `steps` optimizer steps trains with under a torch scheduler (read before it moves, as the Recorder records)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    schedule = scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_a_linear_warm_up_then_cosine_decay_is_named_with_its_lengths_and_peak():
    warmup, decay = 5, 40
    rates = [0.1 * (step + 1) / warmup for step in range(warmup)]  # the 5th step reaches the peak
    rates += [0.1 * (1 + math.cos(math.pi * step / decay)) / 2 for step in range(1, decay)]
    summary = schedule_summary(record_of(rates))
    assert summary == {"steps": 44, "optimizer": "sgd", "momentum": 0.9, "beta2": 0.0, "weight_decay": 5e-4,
                       "first_lr": 0.02, "peak_lr": pytest.approx(0.1), "final_lr": rates[-1], "warmup_steps": 4,
                       "hold_steps": 1, "decay_steps": 39, "decay": "cosine"}


@pytest.mark.parametrize(("scheduler", "decay"), [
    (lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30), "cosine"),
    (lambda optimizer: torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, total_iters=30), "linear"),
    (lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 10, gamma=0.1), "step"),
    (lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9), "other"),
    (lambda optimizer: torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=1), "none"),
])
def test_torchs_schedulers_are_named_by_their_shape_after_the_peak(scheduler, decay):
    summary = schedule_summary(record_of(scheduled(scheduler, 30)))
    assert summary["decay"] == decay and summary["warmup_steps"] == 0 and summary["peak_lr"] == pytest.approx(0.1)


def test_a_constant_lr_holds_over_every_step_and_a_stretch_is_summarised_alone():
    rates = [0.05] * 10 + [0.01] * 10
    assert schedule_summary(record_of(rates), 1, 10) == schedule_summary(record_of(rates[:10]))
    first = schedule_summary(record_of(rates), 1, 10)
    assert (first["hold_steps"], first["decay_steps"], first["decay"], first["final_lr"]) == (10, 0, "none", 0.05)
    second = schedule_summary(record_of(rates), 11)
    assert (second["steps"], second["peak_lr"], second["decay"]) == (10, 0.01, "none")


def test_adams_betas_and_a_range_outside_the_record():
    summary = schedule_summary(record_of([0.001] * 4, optimizer="adam", momentum=0.9, weight_decay=0.0))
    assert (summary["optimizer"], summary["momentum"], summary["weight_decay"]) == ("adam", 0.9, 0.0)
    with pytest.raises(DataError, match=r"steps 3\.\.9 are not within the record's 1\.\.4"):
        schedule_summary(record_of([0.001] * 4), 3, 9)
