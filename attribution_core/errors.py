"""Errors a user can act on: each names the file or value at fault and what to do."""
from __future__ import annotations


class TdxError(Exception):
    """Base class of every error tda-explorer raises on purpose."""


class DataError(TdxError):
    """A data source is missing, malformed or inconsistent."""


class CheckpointError(TdxError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class UnknownRunError(TdxError):
    """A run id that the workspace does not hold."""


class WorkspaceError(TdxError):
    """The workspace cannot be read or written as asked (bad path, read-only, disk full)."""


class SettingsError(TdxError, ValueError):
    """A settings field holds a value the method cannot use."""


class PlanError(TdxError):
    """A cleaning plan that cannot be applied as given: it changes nothing, names examples the run lacks, or relabels to the given class."""
