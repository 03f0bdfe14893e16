"""The test sample being explained: its order (mispredictions first), selector and card."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from attribution_core import inspection

from .context import url_selectbox
from .examples import class_name
from .images import GridItem, example_card

QUERY_KEY = "query"
"""Session-state key and URL query parameter of the chosen test sample."""


def query_order(predictions: pd.DataFrame) -> list[int]:
    """Test indices with mispredictions first (most confident first), then correct ones (least confident first)."""
    order = inspection.query_order(predictions["predicted"].to_numpy(), predictions["confidence"].to_numpy(),
                                   predictions["true"].to_numpy())
    return [int(index) for index in order]


def query_label(test_set, predictions: pd.DataFrame, index: int) -> str:
    """'test 12 · shirt → coat (62 %)' for a misprediction, 'test 3 · bag (99 %)' otherwise."""
    row = predictions.iloc[index]
    true = class_name(test_set, int(row["true"]))
    if row["correct"]:
        return f"test {index} · {true} ({row['confidence']:.0%})"
    return f"test {index} · {true} → {class_name(test_set, int(row['predicted']))} ({row['confidence']:.0%})"


def select_query(index: int) -> None:
    """Make a test index the chosen sample (a button callback)."""
    st.session_state[QUERY_KEY] = index


def query_selectbox(test_set, predictions: pd.DataFrame, container=None) -> int:
    """The test-sample selector, kept in ?query= so a link reopens the same sample (default: the top misprediction)."""
    order = query_order(predictions)
    return url_selectbox(
        "Test sample", order, key=QUERY_KEY, default=order[0], parse=int, target=container, persist_state="session",
        format_func=lambda index: query_label(test_set, predictions, index),
        help="Mispredictions come first, the most confident ones at the top.",
    )


def query_grid_item(test_set, predictions: pd.DataFrame, index: int) -> GridItem:
    """A grid cell for a test sample: true label, and the prediction when it is wrong."""
    row = predictions.iloc[index]
    true = class_name(test_set, int(row["true"]))
    if row["correct"]:
        caption = f"#{index} · {true}  \n:green[{row['confidence']:.0%}]"
    else:
        caption = f"#{index} · {true}  \n:red[→ {class_name(test_set, int(row['predicted']))} {row['confidence']:.0%}]"
    return GridItem(index, test_set.images[index], caption)


def query_card(test_set, predictions: pd.DataFrame, index: int, *, size: int = 168) -> None:
    """The chosen test sample, large, with its true and predicted label."""
    row = predictions.iloc[index]
    true, predicted = class_name(test_set, int(row["true"])), class_name(test_set, int(row["predicted"]))
    with example_card(test_set.images[index], size=size, alt=f"test {index}", caption=f"test {index}", widths=(1, 1.4), gap="small",
                      align="center"):
        st.markdown(f"**True label** {true}")
        st.markdown(f"**Predicted** {predicted} ({row['confidence']:.0%})")
        if row["correct"]:
            st.badge("correct", icon=":material/check:", color="green")
        else:
            st.badge("misprediction", icon=":material/close:", color="red")
