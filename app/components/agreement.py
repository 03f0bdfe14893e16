"""How far two methods agree on one query, in words (the numbers come from the core)."""
from __future__ import annotations

import numpy as np

from attribution_core.scores import rank_correlation, top_k_overlap


def agreement_sentence(first_label: str, second_label: str, first: np.ndarray, second: np.ndarray, k: int) -> str:
    """'TRAK and SOURCE agree on 7 of the top 10 proponents; rank correlation 0.62 over all 600 examples.'"""
    overlap = top_k_overlap(first, second, k)
    correlation = rank_correlation(first, second)
    strength = "strongly" if correlation >= 0.7 else "moderately" if correlation >= 0.4 else "weakly" if correlation >= 0.1 else "hardly"
    correlation_text = "undefined (constant scores)" if np.isnan(correlation) else f"{correlation:.2f} ({strength} alike)"
    return (f"**{first_label}** and **{second_label}** agree on **{overlap} of the top {k}** proponents; "
            f"rank correlation {correlation_text} over all {len(first)} training examples.")
