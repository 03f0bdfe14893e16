"""Settings dataclasses: validation that names the field at fault with its help text."""
from __future__ import annotations

import dataclasses

from .errors import SettingsError


def check_settings(settings: object, **valid: bool) -> None:
    """Raise SettingsError naming every field whose condition is False, with the field's help."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(settings)}  # type: ignore[arg-type]
    bad = [name for name, ok in valid.items() if not ok]
    if bad:
        details = "; ".join(f"{name}={getattr(settings, name)!r} ({helps[name]})" for name in bad)
        raise SettingsError(f"{type(settings).__name__}: invalid {details}")
