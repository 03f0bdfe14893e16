"""Which code a workspace may import: consent, per workspace, before a run's named modules are imported.

A run names code by import path (its model factory, its training function and that function's
augmentation), and opening or retraining the run imports it: a workspace made by someone else
would run their code, which the project's no-pickle rule exists to prevent. So a module is
imported only when it is pre-approved (the standard library, a package installed in this Python,
or this project's own repository, examples/ included) or the user has agreed to it for this
workspace: in the app (a confirmation), with `tdx trust RUN`, or by recording a run with it
(the user ran that code already). Consent is kept outside the workspace, in
$TDX_CONFIG_DIR/trusted_modules.json (default ~/.config/tda-explorer/), keyed by the workspace
and by where the module was found: a workspace cannot trust code for its reader, and another
file under a trusted name is asked about again. Nothing is imported to find a module: its
top-level package is located on sys.path by importlib's PathFinder, which runs no code.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from .errors import TdxError
from .store import atomic_write_json, read_json

CONFIG_ENV = "TDX_CONFIG_DIR"
TRUST_FILE = "trusted_modules.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""This project's repository (attribution_core's parent): its own modules, examples/ included, need no consent."""


class UntrustedCodeError(TdxError):
    """A run names modules the user has not agreed to import for this workspace."""

    def __init__(self, message: str, modules: list[tuple[str, str]]):
        super().__init__(message)
        self.modules = modules
        """(module, where it would be imported from) of every module that needs consent."""


def config_dir() -> Path:
    """Where tdx keeps per-user settings: $TDX_CONFIG_DIR, else ~/.config/tda-explorer."""
    return Path(os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "tda-explorer").expanduser()


def module_location(module: str) -> str:
    """Where a module's top-level package would be imported from (a file or folder), or why it would not be; imports nothing."""
    top = module.split(".")[0]
    if top in sys.builtin_module_names:
        return "built-in"
    spec = importlib.machinery.PathFinder.find_spec(top)
    if spec is None:
        return "not found on this Python's path"
    if spec.origin not in (None, "namespace"):
        return str(Path(spec.origin).resolve())
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


@cache
def _installed_roots() -> tuple[Path, ...]:
    """The folders this Python installs packages into (site-packages, the user's site, the standard library)."""
    folders = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    folders |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(Path(folder).resolve() for folder in folders)


@cache
def _distribution_packages() -> frozenset[str]:
    """Top-level names provided by installed distributions (editable installs included)."""
    return frozenset(importlib.metadata.packages_distributions())


def is_preapproved(module: str) -> bool:
    """Whether a module needs no consent: the standard library, an installed package, or this project's own code."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in _distribution_packages():
        return True
    location = Path(module_location(module))
    return location.is_absolute() and any(location.is_relative_to(root) for root in (PROJECT_ROOT, *_installed_roots()))


_lock = threading.Lock()
_approved: set[tuple[str, str, str, str]] = set()
"""(consent file, workspace, module, location) consented to, as read or written by this process."""


def _consent_file() -> Path:
    return config_dir() / TRUST_FILE


def _consents() -> dict:
    path = _consent_file()
    return read_json(path) if path.is_file() else {"workspaces": {}}


def untrusted(modules: Iterable[str], workspace_root: Path) -> list[tuple[str, str]]:
    """(module, location) of the modules that need the user's consent before this workspace imports them."""
    workspace, consents, needed = str(Path(workspace_root).resolve()), str(_consent_file()), []
    for module in dict.fromkeys(modules):
        if is_preapproved(module):
            continue
        location = module_location(module)
        with _lock:
            if (consents, workspace, module, location) in _approved:
                continue
            if _consents()["workspaces"].get(workspace, {}).get(module) == location:
                _approved.add((consents, workspace, module, location))
                continue
        needed.append((module, location))
    return needed


def trust(modules: Iterable[str], workspace_root: Path) -> None:
    """Record the user's consent to import these modules (where they are now) for this workspace."""
    workspace = str(Path(workspace_root).resolve())
    needed = {module: module_location(module) for module in modules if not is_preapproved(module)}
    if not needed:
        return
    with _lock:
        consents = _consents()
        consents["workspaces"].setdefault(workspace, {}).update(needed)
        atomic_write_json(_consent_file(), consents)
        _approved.update((str(_consent_file()), workspace, module, location) for module, location in needed.items())


def require_trusted(modules: Iterable[str], workspace_root: Path, what: str, command: str) -> None:
    """Raise UntrustedCodeError (nothing imported) unless every module is pre-approved or consented to for this workspace.

    what names the code's owner ("run 'abc'"); command is how to consent on the command line.
    """
    needed = untrusted(modules, workspace_root)
    if needed:
        listed = "; ".join(f"{module} (from {location})" for module, location in needed)
        raise UntrustedCodeError(
            f"{what} imports code that is neither installed nor part of tda-explorer: {listed}. Read it, then agree to run it "
            f"for this workspace with `{command}` (or the confirmation in the app)", needed)
