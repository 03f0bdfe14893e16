"""Plotly figures of the pages: training timeline, segment contributions, counterfactual, LDS, recall, map, data map, training curve."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from attribution_core.runs.run import Run

QUALITATIVE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC", "#EECA3B")
"""One colour per method / class, in order."""

STAGE_SHADES = ("rgba(76,120,168,0.08)", "rgba(245,133,24,0.08)", "rgba(84,162,75,0.08)", "rgba(178,121,162,0.08)")


def _compact(figure: go.Figure, height: int) -> go.Figure:
    figure.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=-0.2))
    return figure


def training_timeline(run: Run) -> go.Figure:
    """Learning rate per optimizer step, stages shaded, checkpoints marked with their test accuracy."""
    steps = np.arange(1, run.trajectory.n_steps + 1)
    figure = go.Figure()
    stage_of_step = np.asarray(run.trajectory.stage)
    for number, stage in enumerate(run.recipe.stages):
        in_stage = steps[stage_of_step == number]
        if len(in_stage):
            figure.add_vrect(x0=in_stage[0] - 0.5, x1=in_stage[-1] + 0.5, fillcolor=STAGE_SHADES[number % len(STAGE_SHADES)],
                             line_width=0, annotation_text=stage.name, annotation_position="top left")
    figure.add_trace(go.Scatter(x=steps, y=run.trajectory.lr, name="learning rate", mode="lines",
                                line=dict(color=QUALITATIVE[0], width=2)))
    checkpoints = run.checkpoints
    figure.add_trace(go.Scatter(
        x=[info.step for info in checkpoints], y=[info.test_accuracy for info in checkpoints], yaxis="y2",
        name="checkpoint (test accuracy)", mode="markers+lines", marker=dict(size=11, symbol="diamond", color=QUALITATIVE[1]),
        line=dict(dash="dot", color=QUALITATIVE[1]),
        text=[f"ckpt {info.index} · step {info.step} · epoch {info.epoch}" for info in checkpoints],
        hovertemplate="%{text}<br>test accuracy %{y:.1%}<extra></extra>",
    ))
    figure.update_layout(xaxis_title="optimizer step", yaxis=dict(title="learning rate", rangemode="tozero"),
                         yaxis2=dict(title="test accuracy", overlaying="y", side="right", tickformat=".0%", rangemode="tozero"))
    return _compact(figure, 320)


def segment_contributions(labels: list[str], example_names: list[str], contributions: np.ndarray) -> go.Figure:
    """Stacked bars: each segment's part of each shown example's score; contributions: (L, n_examples)."""
    figure = go.Figure()
    for number, label in enumerate(labels):
        figure.add_trace(go.Bar(x=example_names, y=contributions[number], name=label, marker_color=QUALITATIVE[number % len(QUALITATIVE)]))
    figure.update_layout(barmode="relative", yaxis_title="contribution to the score",
                         xaxis=dict(title="training example", type="category"))
    return _compact(figure, 300)


def counterfactual_margins(base: float, after: dict[str, float], flipped: dict[str, bool], *,
                           predicted: dict[str, float] | None = None, class_label: str = "") -> go.Figure:
    """The query's margin with everything, and after each removal (random removals in grey), as horizontal bars.

    Horizontal, so the removals' names read whole in a narrow column. predicted: removal name -> the margin the
    method predicted for it, drawn as a black diamond on its bar.
    """
    names = ["nothing removed", *after]
    values = [base, *after.values()]
    colours = [QUALITATIVE[0]] + [QUALITATIVE[3] if name == "top proponents removed" else QUALITATIVE[2]
                                  if name == "top opponents removed" else "#BAB0AC" for name in after]
    texts = [f"{base:+.2f}"] + [f"{value:+.2f}" + (" (flips)" if flipped[name] else "") for name, value in after.items()]
    figure = go.Figure(go.Bar(y=names, x=values, orientation="h", marker_color=colours, text=texts, textposition="outside",
                              cliponaxis=False, name="after retraining", hovertemplate="%{y}: %{x:+.2f}<extra></extra>"))
    if predicted:
        figure.add_trace(go.Scatter(y=list(predicted), x=list(predicted.values()), mode="markers", name="predicted",
                                    marker=dict(symbol="diamond", size=13, color="#111111", line=dict(width=1, color="white")),
                                    hovertemplate="%{y}: predicted %{x:+.2f}<extra></extra>"))
    figure.add_vline(x=0, line_dash="dot")  # the decision boundary, named in the axis title (a label there met the legend)
    whose = f"margin of {class_label}" if class_label else "correct-class margin"
    figure.update_layout(xaxis_title=f"{whose} after retraining<br>(below 0: another class is predicted)",
                         yaxis=dict(autorange="reversed", automargin=True),
                         showlegend=bool(predicted), bargap=0.35)
    figure = _compact(figure, 100 + 34 * len(names))
    # the legend above the bars, clear of the axis title below
    figure.update_layout(margin=dict(l=10, r=40, t=40, b=10), legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"))
    return figure


def lds_bars(labels: list[str], means: list[float], stderrs: list[float]) -> go.Figure:
    """Each method's LDS with its standard error."""
    figure = go.Figure(go.Bar(
        x=labels, y=means, error_y=dict(type="data", array=stderrs, visible=True),
        marker_color=[QUALITATIVE[i % len(QUALITATIVE)] for i in range(len(labels))],
        text=[f"{mean:.3f}" for mean in means], textposition="outside",
    ))
    figure.update_layout(yaxis_title="LDS (mean Spearman ± s.e.)", showlegend=False)
    return _compact(figure, 300)


def lds_scatter(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> go.Figure:
    """Predicted effect (standardised per method) against the actual retrained margin, one colour per method."""
    figure = go.Figure()
    for number, (label, (predicted, actual)) in enumerate(series.items()):
        spread = predicted.std()
        standardised = (predicted - predicted.mean()) / spread if spread > 0 else predicted * 0
        figure.add_trace(go.Scatter(x=standardised, y=actual, mode="markers", name=label,
                                    marker=dict(size=8, opacity=0.75, color=QUALITATIVE[number % len(QUALITATIVE)])))
    figure.update_layout(xaxis_title="predicted effect of the subset (standardised within each method)",
                         yaxis_title="actual margin after retraining on the subset")
    return _compact(figure, 380)


def predicted_against_actual(predicted: list[float], actual: list[float], *, label: str) -> go.Figure:
    """Predicted against actual changes of a margin (one point per removal), with the diagonal where they agree."""
    low, high = min(min(predicted), min(actual), 0.0), max(max(predicted), max(actual), 0.0)
    figure = go.Figure([go.Scatter(x=[low, high], y=[low, high], mode="lines", name="prediction holds",
                                   line=dict(dash="dot", color="#BAB0AC")),
                        go.Scatter(x=predicted, y=actual, mode="markers", name=label, marker=dict(size=10, color=QUALITATIVE[0]))])
    figure.update_layout(xaxis_title="predicted change of the margin (− sum of the removed examples' scores)",
                         yaxis_title="actual change after the order-keeping retrain")
    return _compact(figure, 340)


def recall_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> go.Figure:
    """Fraction of the flipped labels found against the fraction of the training set inspected."""
    figure = go.Figure()
    for number, (label, (inspected, found)) in enumerate(curves.items()):
        figure.add_trace(go.Scatter(x=inspected, y=found, mode="lines", name=label,
                                    line=dict(width=2, color=QUALITATIVE[number % len(QUALITATIVE)])))
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="random order", line=dict(dash="dot", color="#BAB0AC")))
    figure.update_layout(xaxis=dict(title="fraction of training set inspected", tickformat=".0%"),
                         yaxis=dict(title="flipped labels found", tickformat=".0%"))
    return _compact(figure, 340)


@dataclass(frozen=True)
class PointGroup:
    """Map points drawn as one trace.

    split: "train" or "test"; indices: (n,) example indices in that split; positions: (n, 2);
    colour: one colour for all, or values: (n,) scores drawn on a diverging rank scale (rank_colours), their magnitudes
    ranked among ranked_among's (default: values; a map that draws a sample of the points passes every point's scores).
    legend_only: a legend entry without points (indices empty), such as the key of a marker shape.
    """

    name: str
    split: str
    indices: np.ndarray
    positions: np.ndarray
    hover: list[str]
    colour: str | None = None
    values: np.ndarray | None = None
    symbol: str = "circle"
    size: int = 6
    legend_group: str | None = None
    show_legend: bool = True
    legend_only: bool = False
    ranked_among: np.ndarray | None = None


RANK_TICKS = (0.5, 0.9)
"""Ranks of |score| the colour bar labels with the score they stand for (besides 0 and the largest)."""


def rank_colours(values: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
    """(n,) colour positions in [-1, 1] of scores (n,): the sign of each score times the rank of its magnitude among all (0 to 1).

    among: the scores whose magnitudes rank them (default: values themselves), such as every training example's when
    only a sample of them is drawn.

    Scores of one query are mostly tiny with a few large ones, so a linear scale centred on 0 leaves nearly
    every point white; ranking the magnitudes (histogram equalisation) spreads the colours evenly: the tenth of
    the examples with the largest scores, proponents and opponents alike, always has the darkest tenth of the scale.
    """
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if among is not None:
        reference = np.sort(np.abs(np.asarray(among, dtype=np.float64)))
        return np.sign(values) * np.searchsorted(reference, magnitude, side="left") / max(1, len(reference) - 1)
    ranks = np.empty(len(magnitude))
    ranks[np.argsort(magnitude, kind="stable")] = np.arange(len(magnitude)) / max(1, len(magnitude) - 1)
    return np.sign(values) * ranks


def _rank_colour_bar(values: np.ndarray, title: str) -> dict:
    """A colour bar for rank_colours: ticks at ranks 0, RANK_TICKS and 1 of |score| on each side, labelled with those scores."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    ranks = (0.0, *RANK_TICKS, 1.0)
    scores = np.quantile(magnitude, ranks, method="inverted_cdf")
    tickvals = [-rank for rank in reversed(ranks[1:])] + list(ranks)
    ticktext = [f"−{score:.2g}" for score in reversed(scores[1:])] + ["0"] + [f"+{score:.2g}" for score in scores[1:]]
    return dict(title=dict(text=title, side="top"), thickness=12, tickvals=tickvals, ticktext=ticktext, x=1.0, xanchor="left")


WEBGL_POINTS = 5000
"""Maps with more points than this are drawn with WebGL (Scattergl): as SVG a 70,000-point map took 16 s to appear."""


def _point_trace(group: PointGroup, colour_title: str, *, webgl: bool = False) -> go.Scatter | go.Scattergl:
    """One group's markers; each point's customdata is (split, index), so a selection names its examples."""
    marker = dict(size=group.size, symbol=group.symbol, line=dict(width=0.5, color="white"), opacity=0.85)
    order = np.arange(len(group.indices))
    if group.values is not None:
        colours = rank_colours(group.values, group.ranked_among)
        order = np.argsort(np.abs(colours), kind="stable")  # the strongest drawn last, on top of the faint
        # a grey rim keeps the faint points (near-white) visible on the white background
        marker |= dict(color=colours[order], colorscale="RdBu", cmin=-1.0, cmax=1.0, line=dict(width=0.5, color="#9AA0A6"),
                       colorbar=_rank_colour_bar(group.values if group.ranked_among is None else group.ranked_among, colour_title))
    else:
        marker["color"] = group.colour
    # plotly lists no trace without points in its legend: a legend key gets one point with no position
    x, y = ([None], [None]) if group.legend_only else (group.positions[order, 0], group.positions[order, 1])
    # numpy arrays, not lists: plotly checks a list's every element (1.9 s for a 60,000-point map), an array at once
    customdata = np.empty((len(order), 2), dtype=object)
    customdata[:, 0], customdata[:, 1] = group.split, group.indices[order].tolist()
    return (go.Scattergl if webgl else go.Scatter)(
        x=x, y=y, mode="markers", name=group.name, marker=marker,
        legendgroup=group.legend_group, showlegend=group.show_legend,
        text=np.asarray(group.hover, dtype=object)[order], hovertemplate="%{text}<extra></extra>", customdata=customdata,
    )


def _many(groups: list[PointGroup]) -> bool:
    """Whether the groups hold more than WEBGL_POINTS points together."""
    return sum(len(group.indices) for group in groups) > WEBGL_POINTS


def embedding_map(groups: list[PointGroup], *, colour_title: str = "") -> go.Figure:
    """Scatter of the map; each point's customdata is (split, index), so a selection names its examples.

    With a colour bar (a group with values) the legend goes under the map, so the two never overlap.
    """
    figure = go.Figure([_point_trace(group, colour_title, webgl=_many(groups)) for group in groups])
    _compact(figure, 520)
    coloured = any(group.values is not None for group in groups)
    legend = dict(orientation="h", x=0.0, y=-0.02, yanchor="top") if coloured else dict(orientation="v", x=1.0, y=1.0)
    # a drag draws a box: a lasso drag that does not close around points selects nothing, without a word
    figure.update_layout(dragmode="select", xaxis=dict(visible=False), yaxis=dict(visible=False), legend=legend)
    return figure


def data_map(groups: list[PointGroup]) -> go.Figure:
    """Dataset cartography (Swayamdipta et al. 2020): each group's positions are (variability, confidence) of training examples."""
    figure = go.Figure([_point_trace(group, "", webgl=_many(groups)) for group in groups])
    _compact(figure, 440)
    figure.update_layout(dragmode="lasso", xaxis=dict(title="variability (std of p(label) over the epochs)", rangemode="tozero"),
                         yaxis=dict(title="confidence (mean p(label))", range=[-0.02, 1.02]), legend=dict(orientation="v", x=1.0, y=1.0))
    return figure


def training_curve(epochs: np.ndarray, values: np.ndarray, *, label: str, early: tuple[int, int] | None = None) -> go.Figure:
    """One example's recorded value per epoch (epochs, values: (n,)), its early-training window (first, last epoch) shaded."""
    figure = go.Figure(go.Scatter(x=epochs + 1, y=values, mode="lines+markers", name=label, marker=dict(size=5),
                                  line=dict(width=2, color=QUALITATIVE[0]), hovertemplate="epoch %{x}: %{y:.3f}<extra></extra>"))
    if early is not None:
        figure.add_vrect(x0=early[0] + 0.5, x1=early[1] + 1.5, fillcolor=STAGE_SHADES[1], line_width=0,
                         annotation_text="early", annotation_position="top left")  # a narrow window: the caller's caption says more
    if label == "margin":
        figure.add_hline(y=0, line_dash="dot", line_color="#8A8F98")  # above 0 the label has p > 1/2: learned
    figure.update_layout(xaxis_title="epoch", yaxis_title=label, showlegend=False)
    return _compact(figure, 240)
