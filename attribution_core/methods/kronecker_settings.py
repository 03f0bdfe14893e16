"""The settings the Kronecker-factored methods (EK-FAC / K-FAC influence, SOURCE) share, as field factories.

A factory per field rather than a base dataclass: a base's fields would come first, and the settings' field order (their
repr, their positional arguments, the order `dataclasses.asdict` lists them) is part of what users and stored manifests
see. Each method's Settings declares these fields where it always had them; their defaults and help live here once.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def fisher_field() -> Any:
    """fisher: which labels the curvature's gradients are taken for."""
    return field(default="true_fisher", metadata=_help(
        "true_fisher (labels sampled from the model: Gauss–Newton in expectation) or empirical (given labels)"))


def seed_field() -> Any:
    """seed: of the true Fisher's sampled labels and of the projection."""
    return field(default=0, metadata=_help("seed of the sampled labels of the true Fisher and of the projection"))


def query_batch_size_field(per_pass: str) -> Any:
    """query_batch_size: queries per pass over the training set; per_pass says what a pass does with them and its memory."""
    return field(default=None, metadata=_help(f"{per_pass}; None: as many as 256 MiB of query vectors hold"))


def k_field(exact: str, projected: str) -> Any:
    """k: the projected dimension; exact says how exact scores are computed, projected what fit then stores and how it scores."""
    return field(default=None, metadata=_help(
        f"projected dimension; None: exact scores ({exact}); k: fit stores k-dim Kronecker projections of {projected}"))


def kronecker_block_field() -> Any:
    """kronecker_block: the block shape of the projection with k."""
    return field(default=4, metadata=_help("with k: features per P_out ⊗ P_in block (TrakSettings.kronecker_block says what each costs)"))
