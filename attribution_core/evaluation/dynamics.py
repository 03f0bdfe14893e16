"""Training dynamics: what the training record says about each example, from the steps that drew it.

The record (runs/record.py) holds every draw of every training example: its cross-entropy loss and
its correct-class margin logit_y − logsumexp_{j≠y} logit_j from the step's own forward pass.
Both are functions of p_y = exp(−loss), the probability the model gave the label at that draw
(margin = log p_y − log(1 − p_y)). Each signal is a small pure function of a record and the
training-set size N, returning (N,) per-example values; SIGNALS names them as rankings (higher =
more suspicious) and `combined` is the Mislabels page's default. The training loop draws each
member of a stage once per epoch, so an example's successive draws are its successive epochs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..runs.record import TrainingRecord

EARLY_FRACTION = 0.1
"""Early training: this share of an example's draws (but at least MIN_EARLY_DRAWS), chosen once on B4 (see COMBINED)."""

MIN_EARLY_DRAWS = 10
"""The fewest draws early training spans: a 12-epoch run's first tenth (2 draws) is too noisy to rank by."""


@dataclass(frozen=True)
class Draws:
    """The record's example-steps with a recorded loss and margin, grouped by example, in step order within one.

    rows, steps: (D,) int64 training row and 1-based step; losses, margins: (D,) float64;
    position: (D,) 0-based number of the draw among its example's draws; counts: (N,) draws per example.
    """

    rows: np.ndarray
    steps: np.ndarray
    losses: np.ndarray
    margins: np.ndarray
    position: np.ndarray
    counts: np.ndarray

    def mean(self, values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """(N,) each example's mean of values (D,) over its draws (those where keep (D,) holds); NaN where there are none."""
        keep = np.ones(len(self.rows), dtype=bool) if keep is None else keep
        total = np.bincount(self.rows[keep], weights=values[keep], minlength=len(self.counts))
        count = np.bincount(self.rows[keep], minlength=len(self.counts))
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count

    def early(self, fraction: float = EARLY_FRACTION, min_draws: int = MIN_EARLY_DRAWS) -> np.ndarray:
        """(D,) whether each draw is in its example's early window (see early_window)."""
        first, stop = early_window(self.counts, fraction, min_draws)
        return (self.position >= first[self.rows]) & (self.position < stop[self.rows])


def draws(record: TrainingRecord, n_train: int) -> Draws:
    """The record's draws with a recorded (not NaN) loss and margin, grouped by training row (N rows).

    A fitted example's float32 loss can round to 0, which makes its margin +inf: such a draw is
    kept (dropping it would drop every fully fitted draw: 9 % of B4's memorising record) with its
    margin set to the record's largest finite one, the most the float32 loss resolves.
    """
    keep = ~np.isnan(record.losses) & ~np.isnan(record.margins)
    rows, steps = record.indices[keep], record.example_steps()[keep]
    order = np.argsort(rows, kind="stable")  # the record is in step order, so a stable sort keeps each example's draws in order
    rows, steps = rows[order], steps[order]
    counts = np.bincount(rows, minlength=n_train)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    margins = record.margins[keep][order].astype(np.float64)
    resolved = np.isfinite(margins)
    margins = np.where(np.isposinf(margins), margins[resolved].max() if resolved.any() else 0.0, margins)
    return Draws(rows, steps, record.losses[keep][order].astype(np.float64), margins, np.arange(len(rows)) - starts[rows], counts)


def has_dynamics(record: TrainingRecord | None) -> bool:
    """Whether there is a record with per-example losses to rank by (not for a record written without them)."""
    return record is not None and bool(np.isfinite(record.losses).any())


def early_window(counts: np.ndarray, fraction: float = EARLY_FRACTION, min_draws: int = MIN_EARLY_DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """(first (N,), stop (N,)): each example's early draws are its draws first..stop − 1 (0-based), given its draw counts (N,).

    stop: its first max(ceil(fraction × draws), min_draws) draws, all where it has fewer; first:
    1, skipping the draw of the first epoch, taken while the model is barely trained (0 for an
    example drawn once). On B4 the skip raises early_loss's ROC-AUC on the demo from 0.9787 to
    0.9792 and on the --quick demo from 0.941 to 0.946 (top-10 % recall within one example).
    """
    stop = np.minimum(counts, np.maximum(np.ceil(fraction * counts), min_draws)).astype(np.int64)
    return (counts > 1).astype(np.int64), stop


def early_loss(record: TrainingRecord, n_train: int, fraction: float = EARLY_FRACTION, min_draws: int = MIN_EARLY_DRAWS) -> np.ndarray:
    """(N,) mean training loss over each example's early draws (early_window).

    Networks fit the consistent patterns of the data before they memorise its exceptions (Arpit
    et al. 2017, "A closer look at memorization in deep networks"), so early in training a wrong
    label still costs a high loss, however well the model fits it later.
    """
    seen = draws(record, n_train)
    return seen.mean(seen.losses, seen.early(fraction, min_draws))


def area_under_margin(record: TrainingRecord, n_train: int) -> np.ndarray:
    """(N,) AUM (Pleiss et al. 2020, "Identifying mislabeled data using the area under the margin ranking"): the mean margin over all draws.

    Pleiss et al. average logit_y − max_{j≠y} logit_j; the record's margin puts logsumexp in place
    of the max, the soft version (never larger). A low, negative AUM: training pulls against the label.
    The paper's threshold samples (a share of examples moved to a fake extra class, whose AUMs set
    the cut-off) cost an extra training and only place a cut in this order, so a ranking gains nothing from them.
    """
    seen = draws(record, n_train)
    return seen.mean(seen.margins)


def early_margin(record: TrainingRecord, n_train: int, fraction: float = EARLY_FRACTION, min_draws: int = MIN_EARLY_DRAWS) -> np.ndarray:
    """(N,) AUM over early training: the mean (soft) margin over each example's early draws (early_window)."""
    seen = draws(record, n_train)
    return seen.mean(seen.margins, seen.early(fraction, min_draws))


def forgetting_events(record: TrainingRecord, n_train: int) -> np.ndarray:
    """(N,) forgetting events (Toneva et al. 2019, "An empirical study of example forgetting"): correct → incorrect between
    successive draws.

    An example is correct at a draw when its margin is > 0, i.e. p_y > 1/2, which makes the label
    the argmax (an argmax of p_y ≤ 1/2 counts as incorrect: the record has no other class's logit).
    As in Toneva et al., an example never correct counts as forgotten infinitely often: inf;
    NaN for an example never drawn.
    """
    seen = draws(record, n_train)
    correct = seen.margins > 0
    same_example = np.r_[False, seen.rows[1:] == seen.rows[:-1]]
    forgotten = same_example & np.r_[False, correct[:-1] & ~correct[1:]]
    events = np.bincount(seen.rows, weights=forgotten, minlength=n_train)
    learned = np.bincount(seen.rows, weights=correct, minlength=n_train) > 0
    return np.where(seen.counts == 0, np.nan, np.where(learned, events, np.inf))


def learning_time(record: TrainingRecord, n_train: int) -> np.ndarray:
    """(N,) the share of each example's draws before it is learned for good: 0 = correct from its first draw, 1 = wrong at its last.

    Maini et al. 2022 ("Characterizing datapoints via second-split forgetting") call the first
    epoch after which an example is always classified correctly its first-split learning time;
    Jiang et al. 2021 ("Characterizing structural regularities of labeled data") find that
    examples learned late are the atypical and the mislabelled ones. Correct: margin > 0, as in
    forgetting_events. Divided by the example's draws, so that stages of different lengths compare.
    NaN for an example never drawn.
    """
    seen = draws(record, n_train)
    last_wrong = np.full(n_train, -1)
    wrong = seen.margins <= 0
    np.maximum.at(last_wrong, seen.rows[wrong], seen.position[wrong])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (last_wrong + 1) / seen.counts


def data_map(record: TrainingRecord, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(confidence (N,), variability (N,)) of dataset cartography (Swayamdipta et al. 2020, "Dataset cartography").

    Confidence: the mean of p_y = exp(−loss) over the example's draws (its epochs); variability:
    their standard deviation (ddof 0). Low confidence with low variability is "hard to learn",
    where the paper finds the mislabelled examples; high variability is "ambiguous".
    """
    seen = draws(record, n_train)
    probability = np.exp(-seen.losses)
    confidence = seen.mean(probability)
    return confidence, np.sqrt(seen.mean((probability - confidence[seen.rows]) ** 2))


def early_self_confidence(record: TrainingRecord, n_train: int, fraction: float = EARLY_FRACTION,
                          min_draws: int = MIN_EARLY_DRAWS) -> np.ndarray:
    """(N,) cleanlab's self-confidence label quality (Northcutt et al. 2021, "Confident learning") from early-training probabilities.

    cleanlab's self_confidence of an example is the probability given to its label,
    pred_probs[i, labels[i]]: here the mean p_y = exp(−loss) over its early draws (early_window),
    from a model not yet fitted to the example, which is what cleanlab's cross-validation buys
    with extra trainings. (Over all draws it is the data map's confidence.) cleanlab's other
    scores need every class's probability; replaying B4's training to capture them, normalized
    margin and confidence-weighted entropy on the same early probabilities found fewer flipped
    labels (memorising: 0.76 and 0.80 top-10 % recall against 0.83). cleanlab's per-class
    thresholds do not help either, even on out-of-fold probabilities of five models trained on the
    true labels (B4 notes): p(label) over its class's mean p(label) keeps their mean top-10 %
    recall (0.871) and loses 0.004 ROC-AUC; confident-joint issues (cleanlab's default filter)
    ranked first lose recall (0.80-0.86 against 0.86-0.90, on three of them).
    """
    seen = draws(record, n_train)
    return seen.mean(np.exp(-seen.losses), seen.early(fraction, min_draws))


def epochs(record: TrainingRecord) -> np.ndarray:
    """(E,) 0-based epoch of every example-step, counted across stages.

    A stage draws each of its members once per epoch, so its k-th example-step (0-based) lies in
    its epoch k // (its number of distinct rows); a stage's epochs follow the earlier stages'.
    """
    stage_of = np.repeat(record.stage, record.batch_size)
    result = np.empty(len(record.indices), dtype=np.int64)
    first_epoch = 0
    for stage in np.unique(record.stage):  # stages run in order, each a consecutive stretch of steps
        members = np.flatnonzero(stage_of == stage)
        size = len(np.unique(record.indices[members]))
        result[members] = first_epoch + np.arange(len(members)) // size
        first_epoch = int(result[members[-1]]) + 1
    return result


def training_curve(record: TrainingRecord, index: int, values: str = "losses") -> tuple[np.ndarray, np.ndarray]:
    """(epochs (n,), the example's mean recorded "losses" or "margins" in each (n,)) for training row `index`, over the epochs
    that drew it."""
    recorded = getattr(record, values)
    drawn = (record.indices == index) & np.isfinite(recorded)
    shown, inverse = np.unique(epochs(record)[drawn], return_inverse=True)
    return shown, np.bincount(inverse, weights=recorded[drawn].astype(np.float64)) / np.bincount(inverse)


def top_shares(scores: np.ndarray) -> np.ndarray:
    """(N,) each example's place in a ranking by scores (N,) as a share of N from the top: 1/N for the most suspicious, ties averaged."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(scores)]
    shares = np.empty(len(scores))
    shares[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]  # a tie group's mean 1-based place
    return shares / len(scores)


def _forgetting_score(record: TrainingRecord, n_train: int) -> np.ndarray:
    events = forgetting_events(record, n_train)
    finite = events[np.isfinite(events)]
    return np.where(np.isposinf(events), (finite.max() if len(finite) else 0.0) + 1, events)  # never learned: above every count


@dataclass(frozen=True)
class Signal:
    """A suspicion score read from the record alone: a label for people, a one-line description and score(record, N) -> (N,),
    higher = more suspicious."""

    label: str
    description: str
    score: Callable[[TrainingRecord, int], np.ndarray]


SIGNALS: dict[str, Signal] = {
    "early_loss": Signal("Early-training loss", "training loss averaged over each example's early draws (its first tenth, "
                         "at least 10 epochs, less the first)", early_loss),
    "early_aum": Signal("Early-training margin (AUM)", "minus the margin averaged over each example's early draws: AUM "
                        "(Pleiss et al. 2020) before memorisation", lambda record, n: -early_margin(record, n)),
    "cleanlab_early": Signal("Early-training self-confidence (cleanlab)", "cleanlab self-confidence, 1 − p(label), on each "
                             "example's early draws: no extra training", lambda record, n: 1 - early_self_confidence(record, n)),
    "aum": Signal("Area under the margin (AUM)", "minus the area under the margin (Pleiss et al. 2020): the margin averaged "
                  "over every draw", lambda record, n: -area_under_margin(record, n)),
    "confidence": Signal("Data-map confidence", "1 − data-map confidence (Swayamdipta et al. 2020): hard-to-learn examples first",
                         lambda record, n: 1 - data_map(record, n)[0]),
    "variability": Signal("Data-map variability", "data-map variability (Swayamdipta et al. 2020): ambiguous examples first, "
                          "rather than mislabels", lambda record, n: data_map(record, n)[1]),
    "forgetting": Signal("Forgetting events", "forgetting events (Toneva et al. 2019) between successive draws; never-learned "
                         "examples first", _forgetting_score),
    "learning_time": Signal("Learning time", "share of its draws before an example is learned for good (Maini et al. 2022): "
                            "late learners first; weak once a model memorises", learning_time),
}
"""The suspicion scores read from the record alone, by name."""

COMBINED = ("early_loss", "early_aum")
"""The signals `combined` rank-averages, fixed for every run: early training's two summaries in the literature's two units.

Principle: a wrong label shows before the model memorises it (Arpit et al. 2017), so the default
reads only the early window, in the two units the methods it comes from use: the loss (the
small-loss criterion) and the margin (AUM, Pleiss et al. 2020). Every signal of the record is a
function of p(label) at its draws, so a signal over all draws (AUM, confidence, learning time,
forgetting) adds the memorised draws, and with them the memorising setting's collapse: on B4's
runs and four held-out seeds of each setting (benchmarks/RESULTS.md, B4 notes) adding learning
time costs 0.27 of the memorising top-10 % recall, and no added signal gains more than the
seed-to-seed spread. Early loss alone ranks within one or two examples of the pair.
A fixed share of training alone misses on one setting or the other (a tenth: demo 0.777;
a third: memorising 0.750), hence MIN_EARLY_DRAWS.
"""

SCORES_REVISION = 2
"""Raised when a signal's values change for the same record, so that stored rankings are computed again.

2: draws whose float32 loss rounded to 0 (margin +inf) are kept, no longer dropped.
"""


def signal_scores(record: TrainingRecord, n_train: int, name: str) -> np.ndarray:
    """(N,) one of SIGNALS' scores, finite: an example the record never drew gets the lowest (nothing to suspect it of)."""
    scores = np.asarray(SIGNALS[name].score(record, n_train), dtype=np.float64)
    seen = np.isfinite(scores)
    return np.where(seen, scores, scores[seen].min() if seen.any() else 0.0)


def settings() -> dict[str, object]:
    """The choices the rankings depend on (early window, combination), for stored rankings' keys."""
    return {"early_fraction": EARLY_FRACTION, "min_early_draws": MIN_EARLY_DRAWS, "combined": list(COMBINED),
            "revision": SCORES_REVISION}


def combined(record: TrainingRecord, n_train: int) -> np.ndarray:
    """(N,) 1 − the mean over COMBINED's signals of the example's top share: 1 − 1/N for one every signal ranks first."""
    return 1 - np.mean([top_shares(signal_scores(record, n_train, name)) for name in COMBINED], axis=0)
