"""The workspace: a directory holding runs, checkpoints and every computed artifact.

Layout (the README's Workspace section):
  runs/<run-id>/run.json, runs/<run-id>/checkpoints/ckpt_XXXX.safetensors,
  runs/<run-id>/<kind>/<key>/ (states, scores, groundtruth, ...) with manifest.json,
  annotations.sqlite.
A kind that was renamed (FORMER_KINDS) still opens: its complete artifacts are moved to the new
name, under the same key, the first time they are asked for, never recomputed.
Every write goes to a temporary file in the same directory, is fsynced, then renamed over the
target, so a crash leaves the old version or the new one, never half of one. Nothing is
unpickled: tensors are safetensors, arrays .npy without pickle, metadata JSON.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from .distributed import agreed, barrier, rank_and_world
from .errors import CheckpointError, UnknownRunError, WorkspaceError

T = TypeVar("T")

FORMAT_VERSION = 1
"""Bump when the layout of a stored artifact changes: old artifacts then get new keys."""

MANIFEST = "manifest.json"

FORMER_KINDS: dict[str, tuple[str, ...]] = {
    "states": ("features",),  # every method's fitted train-side state
    "representations": ("features",),  # find-similar's unit representations, stored beside the states in older workspaces
}
"""Artifact kind -> the names its artifacts were stored under before (their keys are unchanged)."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """A run id or file name that stays inside its directory (no '/', '..', absolute paths)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise WorkspaceError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' only (no paths, no '..')"
        )
    return name


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _workspace_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise _workspace_error(path, exc) from exc
    _fsync_dir(path.parent)


def _workspace_error(path: Path, exc: OSError) -> WorkspaceError:
    if exc.errno == errno.ENOSPC:
        return WorkspaceError(f"disk full while writing {path}: free space and run again (nothing was changed)")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return WorkspaceError(f"cannot write {path}: the workspace is read-only; pass a writable --workspace")
    return WorkspaceError(f"cannot write {path}: {exc.strerror or exc}")


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (sorted keys, so equal content gives equal bytes)."""
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    """Read a JSON file with an error that names it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise WorkspaceError(f"missing file {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{path} is not valid JSON ({exc}); delete it to recompute") from exc


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save an array as .npy atomically (never with pickled objects)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """Load a .npy file without pickle, memory-mapped if asked."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot read array {path} ({exc}); delete it to recompute") from exc


def mapped_zeros(directory: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero-filled float32 tensor of the shape, memory-mapped from a temporary file in directory (on the CPU).

    Its pages live in the page cache, which the kernel writes back and evicts under memory pressure,
    so arrays larger than RAM fit. The file is unlinked at once: its disk space is freed with the
    tensor, and a crash leaves nothing behind. The space is reserved up front, so a full disk fails
    here, with a WorkspaceError, rather than with a SIGBUS in the middle of a computation.
    """
    n_bytes = 4 * math.prod(shape)
    if n_bytes == 0:  # a zero-length file cannot be mapped
        return torch.zeros(shape)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".mapped-", suffix=".f32")
    except OSError as exc:
        raise _workspace_error(directory, exc) from exc
    try:
        os.posix_fallocate(fd, 0, n_bytes)
        array = np.memmap(name, dtype=np.float32, mode="r+", shape=shape)
    except OSError as exc:
        raise _workspace_error(Path(name), exc) from exc
    finally:
        os.close(fd)
        os.unlink(name)
    return torch.from_numpy(array)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically."""
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(contiguous, metadata=metadata))


@contextlib.contextmanager
def _opened_safetensors(path: Path) -> Iterator[Any]:
    """safe_open of a .safetensors file; anything else (a pickle .pt, a missing, truncated or corrupt file) is refused."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: only .safetensors files are loaded (pickle-based files like .pt can run code); "
            "convert it with safetensors.torch.save_file"
        )
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint {path}: restore it from a copy or train the run again")
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}): it may be truncated or corrupt; "
            "restore it from a copy or train the run again"
        ) from exc


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle .pt, a truncated file) is refused."""
    with _opened_safetensors(path) as handle:  # tensor by tensor from the memory-mapped file: no second copy in memory
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (no tensor is read), refused as load_tensors refuses."""
    with _opened_safetensors(path) as handle:
        return dict(handle.metadata() or {})


def content_key(payload: Any) -> str:
    """A short hash of everything an artifact depends on (with the format version)."""
    canonical = json.dumps({"format": FORMAT_VERSION, "inputs": payload}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


lock_wait_listeners: list[Callable[[bool], None]] = []
"""Called with True before this process waits for a lock another process holds, with False once it holds it: the job
workers listen (a background job paused for a page's job must not keep it waiting on the lock the paused job holds)."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: a second process computing the same artifact waits here (lock_wait_listeners told)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for listener in lock_wait_listeners:
                listener(True)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            finally:
                for listener in lock_wait_listeners:
                    listener(False)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Artifact:
    """A directory of files under a content-hash key, complete once its manifest is written.

    The manifest records the inputs, the format version and each file's size and SHA-256;
    an artifact whose manifest is missing or does not verify is treated as absent (or as a
    resumable partial by jobs that know how to continue it).
    """

    def __init__(self, directory: Path, inputs: Any = None):
        self.directory = Path(directory)
        self.inputs = inputs
        """What the artifact was computed from (its key is their hash); recorded in the manifest."""

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def is_complete(self) -> bool:
        """True when the manifest exists and every listed file has its recorded size."""
        if not self.manifest_path.exists():
            return False
        try:
            manifest = read_json(self.manifest_path)
        except WorkspaceError:
            return False
        if manifest.get("format") != FORMAT_VERSION:
            return False
        return all(
            (self.directory / name).is_file() and (self.directory / name).stat().st_size == entry["size"]
            for name, entry in manifest.get("files", {}).items()
        )

    def verify(self) -> bool:
        """True when complete and every file's checksum matches the manifest."""
        if not self.is_complete():
            return False
        manifest = read_json(self.manifest_path)
        return all(file_sha256(self.directory / name) == entry["sha256"] for name, entry in manifest["files"].items())

    def path(self, name: str) -> Path:
        return self.directory / check_name(name, "file name")

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path)

    def commit(self, inputs: Any, extra: dict[str, Any] | None = None) -> None:
        """Record the manifest (last), which marks the artifact complete."""
        files = {
            entry.name: {"size": entry.stat().st_size, "sha256": file_sha256(entry)}
            for entry in sorted(self.directory.iterdir())
            if entry.is_file() and not entry.name.startswith(".") and entry.name != MANIFEST
        }
        atomic_write_json(self.manifest_path, {"format": FORMAT_VERSION, "inputs": inputs, "files": files, **(extra or {})})

    def lock(self):
        """Lock for computing this artifact (see file_lock)."""
        return file_lock(self.directory.parent / f".{self.directory.name}.lock")

    def adopt(self, former: Path) -> bool:
        """Move a complete artifact stored under an older kind's name (same key) into this one's place; whether it moved.

        An atomic directory rename under this artifact's lock, done only when this one is not complete
        and the former one is: an incomplete one here (an interrupted computation) is discarded for it.
        """
        former = Path(former)
        if not former.is_dir() or not Artifact(former).is_complete():
            return False
        with self.lock():
            if self.is_complete() or not Artifact(former).is_complete():  # another process adopted it meanwhile
                return False
            if self.directory.exists():
                shutil.rmtree(self.directory)
            try:
                os.replace(former, self.directory)
            except OSError as exc:
                raise _workspace_error(self.directory, exc) from exc
            _fsync_dir(self.directory.parent)
            _fsync_dir(former.parent)
        return True

    def compute_once(self, compute: Callable[["Artifact"], dict[str, Any] | None]) -> "Artifact":
        """The artifact, computed first if needed: under its lock, unless complete, compute(self) writes its files, then the manifest.

        compute may return extra manifest entries (e.g. how long it took). A second process
        asking for the same artifact meanwhile waits on the lock and then finds it complete.
        """
        with self.lock():
            if not self.is_complete():
                extra = compute(self)
                self.commit(self.inputs, extra=extra)
        return self


def compute_once_across_ranks(artifact: Artifact, compute: Callable[[], T], save: Callable[[Artifact, T], dict[str, Any] | None],
                              *, collective: bool = True) -> Artifact:
    """The artifact, computed first if needed: compute() gives the result, save(artifact, result) writes its files.

    Under a process group with collective=True, every rank takes part in compute() (a sharded fit, queries shared between
    the ranks) when rank 0 finds the artifact missing; rank 0 alone stores the result and every rank waits for it. Without a
    process group, or with collective=False, this is Artifact.compute_once: a process that finds the same artifact being
    computed elsewhere waits on its lock, then reuses it.
    """
    rank, world = rank_and_world()
    if world == 1 or not collective:
        return artifact.compute_once(lambda stored: save(stored, compute()))
    if agreed(not artifact.is_complete()):  # one decision for every rank: all of them compute, or none does
        result = compute()
        if rank == 0:
            artifact.compute_once(lambda stored: save(stored, result))
        barrier()
    return artifact


class Workspace:
    """The workspace directory: runs, their checkpoints and artifacts, and annotations."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def annotations_path(self) -> Path:
        return self.root / "annotations.sqlite"

    def run_ids(self) -> list[str]:
        """Ids of the runs whose run.json exists, sorted."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(entry.parent.name for entry in self.runs_dir.glob("*/run.json"))

    def run_dir(self, run_id: str, must_exist: bool = True) -> Path:
        """The folder of a run; an unknown id raises an error listing the runs that exist."""
        directory = self.runs_dir / check_name(run_id, "run id")
        if must_exist and not (directory / "run.json").is_file():
            existing = ", ".join(self.run_ids()) or "none yet (try `tdx demo`)"
            raise UnknownRunError(f"no run {run_id!r} in workspace {self.root}; runs: {existing}")
        return directory

    def artifact(self, run_id: str, kind: str, inputs: Mapping[str, Any]) -> Artifact:
        """The artifact runs/<id>/<kind>/<key> of everything it is computed from (key = content_key(inputs)).

        One stored under a former name of the kind (FORMER_KINDS) is moved here first (Artifact.adopt).
        """
        key = check_name(content_key(inputs), "artifact key")
        run_dir = self.run_dir(run_id)
        artifact = Artifact(run_dir / check_name(kind, "artifact kind") / key, dict(inputs))
        for former in FORMER_KINDS.get(kind, ()):
            artifact.adopt(run_dir / former / key)
        return artifact

    def artifacts(self, run_id: str, kind: str) -> list[Artifact]:
        """The complete artifacts of one kind stored for a run, oldest first."""
        directory = self.run_dir(run_id) / check_name(kind, "artifact kind")
        found = [Artifact(entry) for entry in directory.iterdir() if entry.is_dir()] if directory.is_dir() else []
        complete = [artifact for artifact in found if artifact.is_complete()]
        for artifact in complete:
            artifact.inputs = artifact.manifest()["inputs"]
        return sorted(complete, key=lambda artifact: artifact.manifest_path.stat().st_mtime)
