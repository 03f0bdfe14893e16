"""Choosing a method and the part of training it looks at (checkpoints, or training segments where a method splits by them)."""
from __future__ import annotations

import streamlit as st

from attribution_core.api import METHODS
from attribution_core.jobs.ready import default_method
from attribution_core.numerics.segments import even_ranges
from attribution_core.runs.run import Run

from .context import publish_to_url, seed_from_url, url_selectbox
from .core_calls import default_checkpoint_range, method_choices, method_label, unsupported_methods

METHOD_KEY = "method"
"""Session-state key and URL query parameter of the chosen method."""

SEGMENTS_KEY = "segments"
"""Session-state key and URL query parameter of the chosen training segments."""


def checkpoint_label(run: Run, index: int) -> str:
    """'ckpt 3 · step 120 · finetune' for a checkpoint index."""
    info = run.checkpoints[index]
    stage = run.recipe.stages[info.stage].name if info.stage < len(run.recipe.stages) else str(info.stage)
    return f"ckpt {index} · step {info.step} · {stage}"


def method_selectbox(run: Run, container=None) -> str:
    """The method selector, kept in ?method= (default: the run's default method, as `tdx attribute` has it)."""
    choices = method_choices(run)
    unsupported = unsupported_methods(run)
    return url_selectbox(
        "Method", choices, key=METHOD_KEY, default=default_method(run), target=container, persist_state="session", format_func=method_label,
        help=("Not offered for this run: " + "; ".join(unsupported.values()) + ".") if unsupported
        else "Every method of the core can attribute this run.",
    )


def checkpoint_range(run: Run, method: str, container=None) -> tuple[int, ...]:
    """The checkpoints a method uses: one checkpoint, or a range over the run's recorded ones, preset to the method's default.

    A method that reads only the last checkpoint it is given (policy "last": influence, the
    baselines) gets a plain selector of that one checkpoint; a range's first end would change
    nothing. A method with per-segment contributions always uses every checkpoint: its segments
    are chosen after scoring instead (see segment_range). Kept in ?checkpoints_<method>=first-last.
    """
    n = len(run.checkpoints)
    if METHODS[method].has_segments or n == 1:
        return tuple(range(n))
    key, default = f"checkpoints_{method}", default_checkpoint_range(run, method)
    target = container or st
    if METHODS[method].checkpoint_policy == "last":
        chosen = url_selectbox(
            "Checkpoint", list(range(n)), key=key, default=default[1], parse=lambda text: parse_range(text)[1],
            to_text=lambda index: f"{index}-{index}", target=target, persist_state="session",
            format_func=lambda index: checkpoint_label(run, index),
            help=f"{method_label(method)} looks at one trained model: the one saved at this checkpoint.",
        )
        return (chosen,)
    first, last = url_range_slider(
        "Checkpoints", n, key=key, default=default, target=target, format_func=lambda index: checkpoint_label(run, index),
        help="The stretch of training the method averages over (recorded checkpoints, oldest left).",
    )
    return tuple(range(first, last + 1))


def url_range_slider(label: str, n: int, *, key: str, default: tuple[int, int], target=None, **widget_options) -> tuple[int, int]:
    """A range slider over 0..n-1 kept in ?key=first-last, drawn with its seeded value (see seed_from_url); remembered across pages."""
    current = seed_from_url(key, default=default, parse=parse_range, valid=lambda pair: is_range(pair, n))
    first, last = (target or st).select_slider(label, options=list(range(n)), value=tuple(current), key=key,
                                               persist_state="session", **widget_options)
    publish_to_url(key, f"{first}-{last}")
    return first, last


def is_range(pair, n: int) -> bool:
    """Whether pair is a (first, last) range within 0..n-1 (the value of a range slider)."""
    return isinstance(pair, (tuple, list)) and len(pair) == 2 and 0 <= pair[0] <= pair[1] < n


def parse_range(text: str) -> tuple[int, int]:
    """'1-5' -> (1, 5)."""
    first, _, last = text.partition("-")
    return int(first), int(last or first)


def segment_labels(run: Run, n_segments: int) -> list[str]:
    """'segment 1 · ckpt 0–1 · pretrain' per training segment (the core's default even split)."""
    ranges = even_ranges([info.stage for info in run.checkpoints], n_segments)
    return [
        f"segment {number + 1} · ckpt {lo}–{hi - 1} · {run.recipe.stages[run.checkpoints[lo].stage].name}"
        for number, (lo, hi) in enumerate(ranges)
    ]


def segment_range(method: str, labels: list[str], container=None) -> list[int]:
    """The training segments whose contributions are summed: a range over the segments, all by default."""
    if len(labels) == 1:
        return [0]
    everything = (0, len(labels) - 1)
    first, last = url_range_slider(
        "Segments", len(labels), key=SEGMENTS_KEY, default=everything, target=container, format_func=lambda number: labels[number],
        help=f"{method_label(method)} splits training into segments; keep only some to see what that stretch of training contributed.",
    )
    return list(range(first, last + 1))
