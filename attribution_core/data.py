"""Datasets: loading, splitting, subsampling and label noise, with errors that name the file at fault.

Every source yields a (train, test) pair of `Dataset`s holding model-ready tensors (pixels in [0, 1],
shape (n, C, H, W)), uint8 images for display, integer labels, stable example ids and a provenance
record. Sources:

- ``sample``: the Fashion-MNIST subset shipped in sample_data/ (see sample_data/README.md);
- ``digits``: scikit-learn's ``load_digits`` (8x8, pixels/16), split by ``train_test_split``;
- ``fashion_mnist``: the four IDX files (optionally gzipped) of Fashion-MNIST or MNIST;
- ``npz``: keys ``x`` and ``y`` (or ``x_train``/``y_train``), optional ``x_test``/``y_test``,
  ``class_names``, ``ids``/``ids_train``/``ids_test``;
- ``image_folder``: one sub-folder per class (sorted names are the class names). Images are grayscale
  when every image has equal R, G and B, else RGB; images of another size than the most common one are
  resized to it (bilinear). Hidden files (names starting with ".") are ignored, as are plain files at
  the top level (recorded in the provenance); anything else in a class folder that Pillow cannot read
  is an error.

Adding a source: its loader (DataSpec -> (train, test)) and one `DataSource` in DATA_SOURCES; DataSpec,
load_dataset and the CLI's --data help read the table.

Nothing here unpickles: npz files are read with ``allow_pickle=False``.
"""
from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError, SettingsError
from .store import file_sha256

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "sample_data" / "fashion_mnist_sample.npz"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_MAGIC = {"images": 2051, "labels": 2049}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UPLOAD_LIMIT_MB = 5
"""Largest uploaded image accepted, in MB; .streamlit/config.toml's server.maxUploadSize says the same."""
UPLOAD_LIMIT_PIXELS = 4096 * 4096
"""Largest uploaded image accepted, in pixels: checked from the header, before decoding (a small PNG can decode to gigabytes)."""


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from and how it is split/noised; stored in run.json (JSON-able via dataclasses.asdict)."""

    source: str = "sample"
    path: str | None = None
    test_size: float | int = 0.2
    split_seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    noise_fraction: float = 0.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        """Reject values no loader can use, naming the field."""
        if self.source not in DATA_SOURCES:
            raise SettingsError(f"data source {self.source!r} is unknown; choose one of {', '.join(DATA_SOURCES)}")
        self._check_path()
        self._check_test_size()
        for name in ("split_seed", "noise_seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise SettingsError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise SettingsError(f"{name} must be a positive integer or None, got {value!r}")
        if not _is_real(self.noise_fraction) or not 0.0 <= self.noise_fraction <= 1.0:
            raise SettingsError(f"noise_fraction must be a number in [0, 1], got {self.noise_fraction!r}")

    def _check_path(self) -> None:
        """path: a string (a Path is stored as its string), needed by npz/image_folder, refused by digits."""
        if isinstance(self.path, Path):
            object.__setattr__(self, "path", str(self.path))
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise SettingsError(f"path must be a non-empty string or None, got {self.path!r}")
        if self.path is None and self.source in ("npz", "image_folder"):
            raise SettingsError(f"path is required for data source {self.source!r}: give the file or folder to read")
        if self.path is not None and self.source == "digits":
            raise SettingsError("path must be None for data source 'digits' (scikit-learn ships the data)")

    def _check_test_size(self) -> None:
        """test_size: a fraction in (0, 1) or a positive count."""
        value = self.test_size
        if _is_int(value):
            if value < 1:
                raise SettingsError(f"test_size as a count must be at least 1, got {value}")
        elif not _is_real(value) or not 0.0 < value < 1.0:
            raise SettingsError(f"test_size must be a fraction in (0, 1) or a positive integer count, got {value!r}")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Model-ready inputs, labels, display images, stable ids and provenance of one split."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]
    images: np.ndarray
    ids: np.ndarray
    provenance: dict = field(default_factory=dict)
    original_y: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.y.shape[0])

    @property
    def flipped(self) -> np.ndarray:
        """Boolean mask of examples whose label differs from the true one (all False without noise)."""
        if self.original_y is None:
            return np.zeros(len(self), dtype=bool)
        return self.original_y != self.y.numpy()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input, (C, H, W)."""
        return tuple(self.x.shape[1:])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> "Dataset":
        """The examples at `indices` (integer positions or a boolean mask), everything kept aligned."""
        index = np.asarray(indices)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        positions = torch.as_tensor(index, dtype=torch.long)
        return Dataset(
            x=self.x[positions], y=self.y[positions], class_names=self.class_names, images=self.images[index],
            ids=self.ids[index], provenance=dict(self.provenance),
            original_y=None if self.original_y is None else self.original_y[index],
        )


def load_dataset(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """(train, test) for a spec; deterministic: same spec → identical tensors and ids."""
    train, test = DATA_SOURCES[spec.source].load(spec)
    train = _limit(train, spec.max_train, spec.split_seed, "max_train")
    test = _limit(test, spec.max_test, spec.split_seed, "max_test")
    if spec.noise_fraction > 0:
        train = inject_label_noise(train, spec.noise_fraction, spec.noise_seed)
    return train, test


def inject_label_noise(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Flip round(fraction*n) labels, each to a uniformly random OTHER class; records original_y."""
    if not _is_real(fraction) or not 0.0 <= fraction <= 1.0:
        raise SettingsError(f"noise_fraction must be a number in [0, 1], got {fraction!r}")
    if ds.n_classes < 2:
        raise DataError(f"label noise needs at least 2 classes; this dataset has {ds.n_classes}")
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(ds)))
    chosen = rng.choice(len(ds), size=count, replace=False)
    labels = ds.y.numpy().copy()
    labels[chosen] = (labels[chosen] + rng.integers(1, ds.n_classes, size=count)) % ds.n_classes
    original = ds.y.numpy().copy() if ds.original_y is None else ds.original_y
    noise = {"fraction": float(fraction), "seed": int(seed), "n_flipped": count}
    return replace(
        ds, y=torch.as_tensor(labels, dtype=torch.int64), provenance={**ds.provenance, "label_noise": noise}, original_y=original,
    )


def dataset_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    ids: np.ndarray | None = None,
    provenance: dict | None = None,
    where: str = "arrays",
) -> Dataset:
    """A Dataset from images (uint8 or [0,1] float; (n,H,W), (n,H,W,C) or (n,C,H,W)) and integer labels.

    uint8 (or other integer 0..255) images are scaled by 1/255. Float images are taken as model-ready;
    their display copy is x*255 when they lie in [0, 1], else min-max scaled. A 4-D array is read as
    channels-last when its last axis is 1 or 3, else channels-first. `where` names the origin in errors.
    """
    x, display = _images_to_tensor(images, where)
    y = _check_labels(labels, len(x), where)
    names = _class_names(class_names, y, where)
    return _make_dataset(x, y, names, display, ids, provenance or {"source": where}, where)


def image_to_input(image: np.ndarray | Image.Image, like: Dataset) -> torch.Tensor:
    """A user image (any size/mode) as a (1, *like.input_shape) model-ready tensor (grayscale/resize to match)."""
    channels, height, width = like.input_shape
    picture = image if isinstance(image, Image.Image) else _array_to_pil(image)
    try:
        picture = picture.convert("L" if channels == 1 else "RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DataError(f"uploaded image cannot be converted ({exc}); upload a PNG or JPEG picture") from exc
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0)


def read_uploaded_image(name: str, data: bytes, limit_mb: int = UPLOAD_LIMIT_MB) -> Image.Image:
    """An uploaded file as a decoded image; too large (bytes or pixels) or not an image is a DataError naming it."""
    if len(data) > limit_mb * 2**20:
        raise DataError(f"{name} is {len(data) / 2**20:.1f} MB; images up to {limit_mb} MB are accepted: upload a smaller PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > UPLOAD_LIMIT_PIXELS:
            raise DataError(
                f"{name} has {image.width}x{image.height} pixels, more than {UPLOAD_LIMIT_PIXELS:,}; "
                "downscale it and upload a smaller PNG or JPEG"
            )
        image.load()
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name} has too many pixels ({exc}); downscale it and upload a smaller PNG or JPEG") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"{name} is not a readable image ({reason}); upload a PNG or JPEG file") from exc
    return image


def input_conversion(image: Image.Image, like: Dataset) -> dict[str, Any]:
    """What image_to_input does to a picture to match like's inputs: sizes (width, height) and whether colour is dropped.

    Keys: original_size, input_size; resized (the sizes differ); original_aspect, input_aspect (width / height: a
    picture squeezed to another shape changes it); colour_dropped (a picture whose channels differ, given to a
    grayscale model).
    """
    channels, height, width = like.input_shape
    rgb = np.asarray(image.convert("RGB"))
    return {
        "original_size": image.size, "input_size": (width, height), "resized": image.size != (width, height),
        "original_aspect": image.width / image.height, "input_aspect": width / height,
        "colour_dropped": channels == 1 and bool((rgb != rgb[..., :1]).any()),
    }


def input_to_image(x: torch.Tensor) -> np.ndarray:
    """One model input x (1, C, H, W) in [0, 1] as the uint8 image it is: (H, W) for one channel, else (H, W, C)."""
    pixels = np.clip(x[0].numpy().transpose(1, 2, 0) * 255.0, 0, 255).round().astype(np.uint8)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


PIXEL_STATISTICS = ("mean", "standard deviation")
"""What pixel_statistics measures of each input, in its columns' order: brightness and contrast."""


def pixel_statistics(x: torch.Tensor) -> np.ndarray:
    """(n, 2) each model input's PIXEL_STATISTICS over all its pixels; x: (n, C, H, W)."""
    flat = x.reshape(len(x), -1).double()
    return torch.stack([flat.mean(dim=1), flat.std(dim=1, unbiased=False)], dim=1).numpy()


def typical_pixel_range(like: Dataset, share: float = 0.99) -> np.ndarray:
    """(2, 2): per row of PIXEL_STATISTICS, the low and high bound of the central `share` of like's examples."""
    tail = (1 - share) / 2
    return np.quantile(pixel_statistics(like.x), [tail, 1 - tail], axis=0).T


def unlike_training(x: torch.Tensor, typical: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """{statistic: (value, low, high)} of one input x (1, C, H, W) for each of its PIXEL_STATISTICS outside `typical`.

    typical: typical_pixel_range of the training set. Pixel statistics, not the model's features: they need no model
    and catch what people upload to a model of small centred images (a photo on a white background, a noise strip, a
    blank), but an input can be unlike the training data with typical statistics: an empty answer proves nothing.
    """
    values = pixel_statistics(x)[0]
    return {name: (float(value), float(low), float(high)) for name, value, (low, high) in zip(PIXEL_STATISTICS, values, typical)
            if not low <= value <= high}


def read_idx(path: str | Path, kind: str) -> np.ndarray:
    """The array in one IDX file (``kind`` "images" or "labels"; plain or gzipped), checked against its header."""
    path = Path(path)
    raw, gzipped = _read_bytes(path)
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header; the file is truncated, download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise DataError(
            f"{path}: IDX magic number is {magic}, expected {IDX_MAGIC[kind]} for {kind}; "
            "is it the right file (images vs labels), uncompressed or gzipped?"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        unpacked = " (after gunzip)" if gzipped else ""
        raise DataError(
            f"{path}: file is {state}: header {dims} needs {expected} bytes, found {len(raw)}{unpacked}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (n,H,W) uint8, labels (n,) int64) from an IDX image file and its label file."""
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "use files from the same release"
        )
    return images, labels.astype(np.int64)


def find_idx_files(directory: str | Path) -> dict[str, tuple[Path, Path]]:
    """{"train": (images, labels), "test": (...)} paths of the four IDX files in a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory}: no such directory; install Debian's dataset-fashion-mnist or give the folder "
            "holding the IDX files as path"
        )
    return {split: (_find_idx(directory, images), _find_idx(directory, labels)) for split, (images, labels) in IDX_FILES.items()}


def file_record(path: Path) -> dict[str, Any]:
    """Name, size and SHA-256 of a file, for provenance."""
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _load_sample(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """The shipped Fashion-MNIST sample (or the npz at spec.path) with its own train/test split."""
    path = Path(spec.path) if spec.path else SAMPLE_PATH
    if not path.is_file():
        raise DataError(f"{path}: sample file is missing; rebuild it with `python sample_data/build_sample.py`")
    train, test = _npz_datasets(path, spec)
    return (replace(train, provenance={**train.provenance, "source": "sample"}),
            replace(test, provenance={**test.provenance, "source": "sample"}))


def _load_digits(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits, split exactly like train_test_split(X, y, test_size, random_state, stratify=y)."""
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = digits.data, digits.target.astype(np.int64)
    train_index, test_index = _split(labels, spec, "sklearn load_digits", stratify=True)
    names = tuple(str(name) for name in digits.target_names)
    base = {"source": "digits", "loader": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__}

    def part(index: np.ndarray, split: str) -> Dataset:
        """One split: x = pixels/16, display = pixels*16 clipped to 255."""
        x = torch.as_tensor(pixels[index] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        display = np.clip(pixels[index] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8)
        return _make_dataset(x, labels[index], names, display, index, {**base, **_split_info(spec, split, True)}, "digits")

    return part(train_index, "train"), part(test_index, "test")


def _load_fashion_mnist(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST (or MNIST-format) IDX files from spec.path or the Debian package's folder."""
    directory = Path(spec.path or FASHION_MNIST_DIR)
    files = find_idx_files(directory)
    names = FASHION_MNIST_CLASSES

    def part(split: str) -> Dataset:
        """One split, ids = row in the IDX file."""
        images_path, labels_path = files[split]
        images, labels = read_idx_pair(images_path, labels_path)
        provenance = {
            "source": "fashion_mnist", "path": str(directory), "split": split,
            "files": [file_record(images_path), file_record(labels_path)],
        }
        return dataset_from_arrays(images, labels, names, provenance=provenance, where=str(images_path))

    return part("train"), part("test")


def _load_npz(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """An npz file named by spec.path."""
    return _npz_datasets(Path(spec.path), spec)


def _npz_datasets(path: Path, spec: DataSpec) -> tuple[Dataset, Dataset]:
    """An npz with x/y (or x_train/y_train), optional x_test/y_test, class_names and ids."""
    arrays = _read_npz(path)
    x_key, y_key = ("x_train", "y_train") if "x_train" in arrays else ("x", "y")
    for key in (x_key, y_key):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(arrays)}); save images as 'x' and labels as 'y'")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: has only one of 'x_test' and 'y_test'; give both for a fixed split or neither")
    names = _npz_class_names(arrays, path)
    base = {"source": "npz", **file_record(path)}
    if "built_from" in arrays:
        base["built_from"] = json.loads(str(arrays["built_from"]))
    if "x_test" not in arrays:
        everything = _npz_part(arrays, x_key, y_key, ("ids",), names, path, base)
        return _split_dataset(everything, spec, str(path))
    train = _npz_part(arrays, x_key, y_key, ("ids_train", "ids"), names, path, {**base, "split": "train (given)"})
    test = _npz_part(arrays, "x_test", "y_test", ("ids_test",), names, path, {**base, "split": "test (given)"})
    if names is None:
        names = max(train.class_names, test.class_names, key=len)
        train, test = replace(train, class_names=names), replace(test, class_names=names)
    return train, test


def _load_image_folder(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """Images in one sub-folder per class, split by train_test_split."""
    root = Path(spec.path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder with one sub-folder of images per class")
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders found; put each class's images in its own sub-folder")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        members = sorted(entry for entry in class_dir.iterdir() if not entry.name.startswith("."))
        if not members:
            raise DataError(f"{class_dir}: class folder is empty; add images or remove the folder")
        files += members
        labels += [label] * len(members)
    pictures = [_open_image(path) for path in files]
    images, resized = _uniform_images(pictures)
    ignored = sorted(entry.name for entry in root.iterdir() if entry.is_file() and not entry.name.startswith("."))
    provenance = {
        "source": "image_folder", "path": str(root), "n_files": len(files), "bytes": sum(p.stat().st_size for p in files),
        "image_size": list(images.shape[1:3]), "mode": "L" if images.ndim == 3 else "RGB", "n_resized": resized,
        "ignored_files": ignored,
    }
    everything = dataset_from_arrays(images, np.array(labels), [d.name for d in class_dirs], provenance=provenance, where=str(root))
    return _split_dataset(everything, spec, str(root))


@dataclass(frozen=True)
class DataSource:
    """A data source: its name (DataSpec.source, `tdx train --data`), one line on what it reads, and its loader."""

    name: str
    description: str
    load: Callable[[DataSpec], tuple[Dataset, Dataset]]


DATA_SOURCES: dict[str, DataSource] = {source.name: source for source in (
    DataSource("sample", "the Fashion-MNIST subset shipped in sample_data/ (or an npz of its layout at path)", _load_sample),
    DataSource("digits", "scikit-learn's 8x8 digits", _load_digits),
    DataSource("fashion_mnist", f"the four IDX files of Fashion-MNIST or MNIST in the folder at path (without one, {FASHION_MNIST_DIR} "
               "of Debian's dataset-fashion-mnist)", _load_fashion_mnist),
    DataSource("npz", "an .npz file at path: x and y, optional x_test and y_test, class_names, ids", _load_npz),
    DataSource("image_folder", "the folder at path, one sub-folder of images per class", _load_image_folder),
)}
"""Every data source by name, in the order the CLI lists them."""

def describe_sources() -> str:
    """Every data source with what it reads, as a help text lists them ("sample: ...; digits: ...")."""
    return "; ".join(f"{name}: {source.description}" for name, source in DATA_SOURCES.items())


def _make_dataset(
    x: torch.Tensor, y: np.ndarray, names: tuple[str, ...], display: np.ndarray, ids: np.ndarray | None,
    provenance: dict, where: str,
) -> Dataset:
    """A checked Dataset: non-empty, finite inputs, ids aligned and unique."""
    if len(x) == 0:
        raise DataError(f"{where}: the dataset is empty; it needs at least one example")
    if not torch.isfinite(x).all():
        raise DataError(_nonfinite_message(x.numpy(), where))
    ids = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (len(x),) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{where}: ids must be {len(x)} integers, one per example, got shape {ids.shape} of {ids.dtype}")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{where}: ids are not unique; each example needs its own id")
    return Dataset(
        x=x.contiguous(), y=torch.as_tensor(y, dtype=torch.int64), class_names=tuple(names),
        images=np.ascontiguousarray(display), ids=ids.astype(np.int64), provenance=provenance,
    )


def _images_to_tensor(images: np.ndarray, where: str) -> tuple[torch.Tensor, np.ndarray]:
    """(model-ready (n,C,H,W) float32, display uint8 (n,H,W) or (n,H,W,3)) from an image array."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    elif array.ndim == 4 and array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DataError(
            f"{where}: images have shape {np.shape(images)}; expected (n, H, W), (n, H, W, 1|3) or (n, 1|3, H, W)"
        )
    if array.shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty; it needs at least one example")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise DataError(f"{where}: integer pixels must lie in 0..255, found {array.min()}..{array.max()}")
        display = array.astype(np.uint8)
        x = display.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(_nonfinite_message(x, where))
        display = _display_from_float(x)
    else:
        raise DataError(f"{where}: images have dtype {array.dtype}; use uint8 pixels or floats in [0, 1]")
    display = display[..., 0] if display.shape[-1] == 1 else display
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), display


def _nonfinite_message(x: np.ndarray, where: str) -> str:
    """Which examples (positions, the first five) hold NaN or infinite pixels."""
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return f"{where}: images contain NaN or infinite values ({len(bad)} examples: {shown}); clean or drop those examples"


def _display_from_float(x: np.ndarray) -> np.ndarray:
    """uint8 display copy of float images: x*255 in [0, 1], else min-max scaled."""
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        x = (x - low) / (high - low) if high > low else np.zeros_like(x)
    return np.round(x * 255.0).astype(np.uint8)


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels as (n,) int64, non-negative whole numbers."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise DataError(f"{where}: labels have shape {array.shape} but there are {n} images; give one label per image")
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and (array == np.round(array)).all():
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {array.dtype}; give integer class indices 0..K-1")
    if array.min() < 0:
        raise DataError(f"{where}: labels contain negative value {array.min()}; give class indices 0..K-1")
    return array.astype(np.int64)


def _class_names(class_names: Sequence[str] | None, y: np.ndarray, where: str) -> tuple[str, ...]:
    """Class names, checked to cover every label; "0".."K-1" when none are given."""
    if class_names is None:
        return tuple(str(k) for k in range(int(y.max()) + 1))
    names = tuple(str(name) for name in class_names)
    if y.max() >= len(names):
        raise DataError(
            f"{where}: label {y.max()} is out of range for {len(names)} class names; labels must be 0..{len(names) - 1}"
        )
    return names


def _array_to_pil(image: np.ndarray) -> Image.Image:
    """A PIL image from an uploaded array: (H,W), (H,W,1|3|4), uint8 or [0,1] float."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise DataError(f"uploaded image has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError("uploaded image contains NaN or infinite values")
        array = _display_from_float(array.astype(np.float32))
    elif not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise DataError(f"uploaded image has dtype {array.dtype}; expected uint8 pixels 0..255 or floats in [0, 1]")
    return Image.fromarray(array.astype(np.uint8))


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """(file contents, whether they were gzipped), gunzipped when the data starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw), True) if raw[:2] == b"\x1f\x8b" else (raw, False)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is truncated or corrupt, download it again") from exc


def _find_idx(directory: Path, name: str) -> Path:
    """The IDX file `name` in a directory, accepting .gz and the 'train-images.idx3-ubyte' spelling."""
    dotted = name.replace("-idx", ".idx")
    candidates = [directory / (stem + suffix) for stem in (name, dotted) for suffix in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: IDX file {name} not found (looked for {', '.join(c.name for c in candidates)})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz file, refusing anything that needs pickle."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; give the path of an .npz file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an npz file (no zip archive inside); save the arrays with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{path}: holds object arrays that need pickle, which is refused for safety; "
                "save plain numeric arrays (and class_names as a string array)"
            ) from exc
        raise DataError(f"{path}: not a readable npz file ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc}); save it with numpy.savez") from exc


def _npz_class_names(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, ...] | None:
    """The optional class_names array as strings."""
    if "class_names" not in arrays:
        return None
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: class_names must be a 1-D string array, got shape {names.shape} of {names.dtype}")
    return tuple(str(name) for name in names.astype(str))


def _npz_part(
    arrays: dict[str, np.ndarray], x_key: str, y_key: str, id_keys: tuple[str, ...], names: tuple[str, ...] | None,
    path: Path, provenance: dict,
) -> Dataset:
    """One split of an npz, errors naming the file and keys."""
    ids = next((arrays[key] for key in id_keys if key in arrays), None)
    return dataset_from_arrays(arrays[x_key], arrays[y_key], names, ids=ids, provenance=provenance, where=f"{path} [{x_key}/{y_key}]")


def _open_image(path: Path) -> Image.Image:
    """A fully decoded RGB image, or a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: class folders must hold image files only; move or remove this entry")
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not an image Pillow can read ({exc}); remove it or convert it to PNG") from exc


def _uniform_images(pictures: list[Image.Image]) -> tuple[np.ndarray, int]:
    """(n,H,W) or (n,H,W,3) uint8 at the most common size, and how many images were resized."""
    target = Counter(picture.size for picture in pictures).most_common(1)[0][0]
    resized = sum(picture.size != target for picture in pictures)
    arrays = np.stack([
        np.asarray(picture if picture.size == target else picture.resize(target, Image.Resampling.BILINEAR))
        for picture in pictures
    ])
    gray = bool((arrays[..., 0] == arrays[..., 1]).all() and (arrays[..., 1] == arrays[..., 2]).all())
    return (arrays[..., 0] if gray else arrays), resized


def _split(labels: np.ndarray, spec: DataSpec, where: str, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions by train_test_split over indices, so the split equals splitting the arrays themselves."""
    from sklearn.model_selection import train_test_split

    if len(labels) < 2:
        raise DataError(
            f"{where}: holds {len(labels)} example; a train/test split needs at least 2: "
            "add examples, or give a fixed split as x_test/y_test"
        )
    try:
        return train_test_split(
            np.arange(len(labels)), test_size=spec.test_size, random_state=spec.split_seed,
            stratify=labels if stratify else None,
        )
    except ValueError as exc:
        raise SettingsError(f"test_size={spec.test_size!r} cannot split {len(labels)} examples of {where}: {exc}") from exc


def _split_dataset(everything: Dataset, spec: DataSpec, where: str) -> tuple[Dataset, Dataset]:
    """(train, test) of a dataset without a given split, stratified when every class has two or more examples."""
    counts = np.bincount(everything.y.numpy())
    stratified = bool(counts[counts > 0].min() >= 2)
    train_index, test_index = _split(everything.y.numpy(), spec, where, stratify=stratified)
    return tuple(
        replace(everything.subset(index), provenance={**everything.provenance, **_split_info(spec, split, stratified)})
        for index, split in ((train_index, "train"), (test_index, "test"))
    )


def _split_info(spec: DataSpec, split: str, stratified: bool) -> dict[str, Any]:
    """Provenance entry describing a train_test_split."""
    return {"split": split, "test_size": spec.test_size, "split_seed": spec.split_seed, "stratified": stratified}


def _limit(ds: Dataset, limit: int | None, seed: int, name: str) -> Dataset:
    """A class-stratified, seeded subsample of at most `limit` examples, in the original order."""
    if limit is None or limit >= len(ds):
        return ds
    chosen = stratified_subsample(ds.y.numpy(), limit, seed)
    return replace(ds.subset(chosen), provenance={**ds.provenance, name: limit, "subsample_seed": seed})


def stratified_subsample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted positions of `count` examples, per-class counts proportional to the class sizes (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: count - int(take.sum())]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(t), replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)
