"""Image grids: dataset images enlarged with sharp pixels, a caption and a button per cell.

A cell of a dense grid is 50 to 120 pixels wide between 1280 and 1920 pixels of window, too
narrow for a word on a button: a cell's button shows an icon, its label is there for screen
readers only (main.py's GRID_CSS hides it from view), and "label #index" is its tooltip. Captions
wrap between words only (GRID_CSS too).

A cell's image and caption are one element, the image inline in it: drawn as two, with the image a
file the browser fetched afterwards, a new sample's captions showed under the old sample's images
until the fetches came back (1 to 3 s on a busy server).
"""
from __future__ import annotations

import base64
import io
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import streamlit as st
from PIL import Image


def enlarged(image: np.ndarray, size: int) -> Image.Image:
    """A dataset image, (H, W) or (H, W, C) uint8, scaled to `size` pixels wide with sharp pixels."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    picture = Image.fromarray(array.astype(np.uint8))
    height = max(1, round(size * picture.height / picture.width))
    return picture.resize((size, height), Image.Resampling.NEAREST)


def inline_png(picture: Image.Image) -> str:
    """The picture as a PNG data URI: it arrives inside the element that shows it, with nothing to fetch."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class GridItem:
    """One cell of a grid: which example, its image, a markdown caption under it, and its button's tooltip (None: the default)."""

    index: int
    image: np.ndarray
    caption: str
    tooltip: str | None = None


def current_page(n_items: int, per_page: int, *, key: str, max_visible_pages: int = 7) -> range:
    """Positions of the items on the page chosen in a st.pagination widget (drawn only when there are several pages)."""
    n_pages = -(-n_items // per_page)
    page = st.pagination(n_pages, key=key, max_visible_pages=max_visible_pages) if n_pages > 1 else 1
    return range((page - 1) * per_page, min(page * per_page, n_items))


GRID_KEY_PREFIX = "grid_"
"""Every grid is drawn in a container keyed `grid_<key>` (main.py's GRID_CSS styles what is inside)."""

OPEN_ICON = ":material/open_in_full:"
"""The cell button's icon when the caller names none: open this example."""


def image_grid(
    items: Sequence[GridItem],
    *,
    columns: int,
    key: str,
    button_label: str | None = None,
    button_icon: str = OPEN_ICON,
    on_click: Callable[[int], None] | None = None,
    selected: int | None = None,
    image_size: int = 112,
    bordered: bool = True,
    checked: Collection[int] = (),
    on_check: Callable[[int, bool], None] | None = None,
) -> int | None:
    """Draw items in rows of `columns` cells; returns the index whose button was pressed, if any.

    Each cell's image and caption are one element (its image's alt text "#index"), so they change together.

    With button_label, each cell gets a button (keyed `{key}_{index}`) that shows `button_icon`
    (the label is its accessible name) and has "{button_label} #{index}" as its tooltip, followed by
    the item's own tooltip when it has one;
    `on_click(index)` runs as its callback, before the next run of the page. The `selected`
    item's button is highlighted. (A button with a tooltip is drawn twice, once hidden: a
    browser test finds it as `.st-key-<key>_<index> button:visible`.)

    With on_check, each cell also gets a checkbox (keyed `check_{key}_{index}`, label "Select #index"
    for screen readers), ticked when its index is in `checked`; `on_check(index, ticked)` runs when
    the user changes it. `checked` is the caller's record, so ticks survive the grid's pages.
    """
    pressed = None
    with st.container(key=f"{GRID_KEY_PREFIX}{key}", gap="small"):
        for start in range(0, len(items), columns):
            cells = st.columns(columns, gap="small")
            for cell, item in zip(cells, items[start : start + columns]):
                with cell.container(border=bordered, gap="xsmall"):
                    st.image(inline_png(enlarged(item.image, image_size)), caption=item.caption, alt=f"#{item.index}", width="stretch")
                    if on_check is not None:
                        check_key = f"check_{key}_{item.index}"
                        st.session_state[check_key] = item.index in checked  # before the widget: the caller's record rules
                        st.checkbox(f"Select #{item.index}", key=check_key, label_visibility="collapsed",
                                    on_change=lambda index=item.index, name=check_key: on_check(index, bool(st.session_state[name])))
                    if button_label is not None:
                        clicked = st.button(
                            button_label, icon=button_icon,
                            help=f"{button_label} #{item.index}" + (f": {item.tooltip}" if item.tooltip else ""),
                            key=f"{key}_{item.index}",
                            width="stretch", type="primary" if item.index == selected else "secondary",
                            on_click=on_click, args=(item.index,) if on_click else None,
                        )
                        if clicked:
                            pressed = item.index
    return pressed


@contextmanager
def example_card(image: np.ndarray, *, size: int, alt: str, caption: str | None = None, widths: tuple[float, float] = (1, 1.6),
                 gap: str = "large", align: str = "top") -> Iterator[None]:
    """One example shown large: its image (`size` pixels wide, inline, with a caption) on the left; the block writes its text on the right.

    alt names the example ("#609"), as a grid cell's image does; widths: the two columns' relative widths; gap and align:
    st.columns' gap and vertical_alignment.
    """
    image_column, text_column = st.columns(list(widths), gap=gap, vertical_alignment=align)
    image_column.image(inline_png(enlarged(image, size)), caption=caption, alt=alt)
    with text_column:
        yield
