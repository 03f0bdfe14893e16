"""Errors a user can act on: each names the file or value at fault and what to do."""
from __future__ import annotations

from typing import ClassVar


class TdxError(Exception):
    """Base class of every error tda-explorer raises on purpose."""

    retryable: ClassVar[bool] = True
    """Whether the same call may succeed later with the same inputs (after space is freed, consent given, a file
    restored, the user's code fixed); False where only other inputs can help, so a page offers no 'Try again'."""


class DataError(TdxError):
    """A data source is missing, malformed or inconsistent."""

    retryable = False


class CheckpointError(TdxError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class UnknownRunError(TdxError):
    """A run id that the workspace does not hold."""


class WorkspaceError(TdxError):
    """The workspace cannot be read or written as asked (bad path, read-only, disk full)."""


class SettingsError(TdxError, ValueError):
    """A settings field holds a value the method cannot use (or a run cannot do what is asked of it)."""

    retryable = False


class PlanError(TdxError):
    """A cleaning plan that cannot be applied as given: it changes nothing, names examples the run lacks, or relabels to the given class."""

    retryable = False
