"""How far two methods agree on one query, in words (the numbers come from the core)."""
from __future__ import annotations

import numpy as np

from attribution_core.scores import rank_correlation, top_k_overlap


def agreement_sentence(first_label: str, second_label: str, first: np.ndarray, second: np.ndarray, k: int) -> str:
    """'TRAK and SOURCE agree on 7 of their top 10 proponents …; rank correlation over all 600 examples 0.62 …'.

    The overlap comes first because it is what a grid shows; the rank correlation weighs every training
    example alike, and most of them have scores near zero whose order is noise, so a low correlation
    beside a large overlap is no contradiction: the sentence says so.
    """
    overlap = top_k_overlap(first, second, k)
    correlation = rank_correlation(first, second)
    if np.isnan(correlation):
        correlation_text = "undefined (one method gives every example the same score)"
    else:
        strength = ("strongly" if correlation >= 0.7 else "moderately" if correlation >= 0.4
                    else "weakly" if correlation >= 0.1 else "hardly")
        correlation_text = f"{correlation:.2f} ({strength} alike)"
    return (f"**{first_label}** and **{second_label}** agree on **{overlap} of their top {k}** proponents, the examples a grid "
            f"shows. Their rank correlation over all {len(first):,} training examples is {correlation_text}: it weighs every "
            "example alike, most of them score near zero, and their order there is noise, so it can be low while the tops agree.")
