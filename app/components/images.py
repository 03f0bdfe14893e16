"""Image grids: dataset images enlarged with sharp pixels, a caption and a button per cell."""
from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class GridItem:
    """One cell of a grid: which example, its image, and a markdown caption under it."""

    index: int
    image: np.ndarray
    caption: str


def current_page(n_items: int, per_page: int, *, key: str, max_visible_pages: int = 7) -> range:
    """Positions of the items on the page chosen in a st.pagination widget (drawn only when there are several pages)."""
    n_pages = -(-n_items // per_page)
    page = st.pagination(n_pages, key=key, max_visible_pages=max_visible_pages) if n_pages > 1 else 1
    return range((page - 1) * per_page, min(page * per_page, n_items))


def image_grid(
    items: Sequence[GridItem],
    *,
    columns: int,
    key: str,
    button_label: str | None = None,
    on_click: Callable[[int], None] | None = None,
    selected: int | None = None,
    image_size: int = 112,
    bordered: bool = True,
) -> int | None:
    """Draw items in rows of `columns` cells; returns the index whose button was pressed, if any.

    With button_label, each cell gets a button (keyed `{key}_{index}`); `on_click(index)` runs as
    its callback, before the next run of the page. The `selected` item's button is highlighted.
    """
    pressed = None
    for start in range(0, len(items), columns):
        cells = st.columns(columns, gap="small")
        for cell, item in zip(cells, items[start : start + columns]):
            with cell.container(border=bordered, gap="xsmall"):
                st.image(enlarged(item.image, image_size), width="stretch")
                st.caption(item.caption)
                if button_label is not None:
                    clicked = st.button(
                        button_label, key=f"{key}_{item.index}", width="stretch",
                        type="primary" if item.index == selected else "secondary",
                        on_click=on_click, args=(item.index,) if on_click else None,
                    )
                    if clicked:
                        pressed = item.index
    return pressed
