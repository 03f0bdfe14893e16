"""Data loading: exact splits, the shipped sample, subsampling, label noise, file formats and bad inputs."""
from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from attribution_core.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    UPLOAD_LIMIT_MB,
    DataSpec,
    dataset_from_arrays,
    find_idx_files,
    image_to_input,
    inject_label_noise,
    load_dataset,
    read_idx,
    read_uploaded_image,
)
from attribution_core.errors import DataError, SettingsError

DIGITS = DataSpec(source="digits", test_size=360, split_seed=0)


@pytest.fixture(scope="module")
def sample():
    """The shipped sample, loaded once."""
    return load_dataset(DataSpec())


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_idx_dir(directory: Path, n_train: int = 12, n_test: int = 5, suffix: str = "") -> dict[str, np.ndarray]:
    """Four small IDX files in `directory`; returns the arrays written."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8), "train_y": np.arange(n_train) % 10,
        "test_x": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8), "test_y": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", arrays["train_x"])
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", arrays["train_y"])
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", arrays["test_x"])
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", arrays["test_y"])
    return arrays


def write_png(path: Path, size: tuple[int, int], color: int | tuple[int, int, int], mode: str = "L") -> None:
    """A plain one-colour PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# --- sources ---------------------------------------------------------------------------------------------------


def test_digits_split_equals_sklearn_train_test_split_exactly():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data / 16, digits.target, test_size=360, random_state=0,
                                                        stratify=digits.target)
    train, test = load_dataset(DIGITS)
    assert (len(train), len(test)) == (1437, 360)
    assert torch.equal(train.x.reshape(len(train), -1), torch.as_tensor(x_train, dtype=torch.float32))
    assert torch.equal(test.x.reshape(len(test), -1), torch.as_tensor(x_test, dtype=torch.float32))
    assert np.array_equal(train.y.numpy(), y_train) and np.array_equal(test.y.numpy(), y_test)
    assert np.array_equal(digits.data[train.ids] / 16, x_train)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64 and train.input_shape == (1, 8, 8)
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.n_classes == 10


def test_sample_is_balanced_with_expected_shapes(sample):
    train, test = sample
    assert (len(train), len(test)) == (6000, 1000)
    assert np.bincount(train.y.numpy()).tolist() == [600] * 10 and np.bincount(test.y.numpy()).tolist() == [100] * 10
    assert train.x.shape == (6000, 1, 28, 28) and train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert train.images.shape == (6000, 28, 28) and train.images.dtype == np.uint8
    assert train.class_names == FASHION_MNIST_CLASSES and train.original_y is None and not train.flipped.any()
    assert torch.equal(train.x[:, 0], torch.as_tensor(train.images, dtype=torch.float32) / 255)
    assert train.provenance["source"] == "sample" and len(train.provenance["sha256"]) == 64


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_sample_ids_are_rows_of_the_idx_files(sample):
    files = find_idx_files(FASHION_MNIST_DIR)
    train, test = sample
    assert np.array_equal(read_idx(files["train"][0], "images")[train.ids], train.images)
    assert np.array_equal(read_idx(files["test"][1], "labels")[test.ids], test.y.numpy())


def test_same_spec_gives_identical_data():
    spec = DataSpec(source="digits", test_size=0.25, split_seed=3, max_train=200, max_test=50, noise_fraction=0.2, noise_seed=5)
    (a_train, a_test), (b_train, b_test) = load_dataset(spec), load_dataset(spec)
    for a, b in ((a_train, b_train), (a_test, b_test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and np.array_equal(a.ids, b.ids)
    assert np.array_equal(a_train.original_y, b_train.original_y)
    assert DataSpec(**asdict(spec)) == spec


def test_max_train_keeps_ids_and_rows_aligned_and_stratified(sample):
    full_train, _ = sample
    small, small_test = load_dataset(DataSpec(max_train=500, max_test=30))
    assert len(small) == 500 and len(small_test) == 30
    assert np.bincount(small.y.numpy()).tolist() == [50] * 10
    assert np.all(np.diff(small.ids) > 0)
    position = {int(i): p for p, i in enumerate(full_train.ids)}
    rows = [position[int(i)] for i in small.ids]
    assert torch.equal(full_train.x[rows], small.x) and np.array_equal(full_train.images[rows], small.images)


def test_subset_keeps_everything_aligned():
    train, _ = load_dataset(DataSpec(source="digits", noise_fraction=0.3, max_train=100))
    part = train.subset(np.array([5, 1, 7]))
    assert np.array_equal(part.ids, train.ids[[5, 1, 7]]) and torch.equal(part.y, train.y[[5, 1, 7]])
    assert np.array_equal(part.original_y, train.original_y[[5, 1, 7]]) and np.array_equal(part.flipped, train.flipped[[5, 1, 7]])
    assert len(train.subset(train.flipped)) == int(train.flipped.sum())


# --- label noise -----------------------------------------------------------------------------------------------


def test_noise_flips_exactly_round_fraction_n_to_other_classes():
    clean, _ = load_dataset(DataSpec(source="digits", max_train=333))
    noisy = inject_label_noise(clean, 0.1, seed=7)
    assert noisy.flipped.sum() == round(0.1 * 333)
    assert np.array_equal(noisy.original_y, clean.y.numpy())
    assert np.all(noisy.y.numpy()[noisy.flipped] != noisy.original_y[noisy.flipped])
    assert torch.equal(noisy.y[~torch.as_tensor(noisy.flipped)], clean.y[~torch.as_tensor(noisy.flipped)])
    assert torch.equal(inject_label_noise(clean, 0.1, seed=7).y, noisy.y)
    assert not torch.equal(inject_label_noise(clean, 0.1, seed=8).y, noisy.y)
    assert clean.original_y is None and noisy.provenance["label_noise"]["n_flipped"] == 33


def test_noise_through_spec_touches_train_only():
    train, test = load_dataset(DataSpec(source="digits", noise_fraction=0.25, noise_seed=1, max_train=200))
    assert train.flipped.sum() == 50 and test.original_y is None


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(2, 5), fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_noise_property(n, k, fraction, seed):
    ds = dataset_from_arrays(np.zeros((n, 2, 2), np.uint8), np.arange(n) % k, [str(c) for c in range(k)])
    noisy = inject_label_noise(ds, fraction, seed)
    assert noisy.flipped.sum() == round(fraction * n)
    assert noisy.y.min() >= 0 and noisy.y.max() < k


# --- file formats ----------------------------------------------------------------------------------------------


def test_npz_round_trip_with_given_split(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.integers(0, 256, (8, 5, 6), dtype=np.uint8), rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    path = tmp_path / "given.npz"
    np.savez(path, x=x, y=np.arange(8) % 3, x_test=x_test, y_test=np.arange(4) % 3, class_names=np.array(["a", "b", "c"]),
             ids=np.arange(100, 108))
    train, test = load_dataset(DataSpec(source="npz", path=str(path)))
    assert np.array_equal(train.images, x) and np.array_equal(test.images, x_test)
    assert train.class_names == ("a", "b", "c") and train.input_shape == (1, 5, 6)
    assert train.ids.tolist() == list(range(100, 108)) and test.ids.tolist() == [0, 1, 2, 3]


def test_npz_round_trip_split_and_layouts(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb, y=np.arange(20) % 2)
    train, test = load_dataset(DataSpec(source="npz", path=str(tmp_path / "rgb.npz"), test_size=5))
    assert (len(train), len(test)) == (15, 5) and train.input_shape == (3, 4, 4) and train.images.shape == (15, 4, 4, 3)
    assert sorted(np.concatenate([train.ids, test.ids]).tolist()) == list(range(20))
    assert np.array_equal(train.images, rgb[train.ids]) and train.class_names == ("0", "1")
    channels_first = rng.random((10, 3, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "float.npz", x=channels_first, y=np.arange(10) % 2)
    train, _ = load_dataset(DataSpec(source="npz", path=str(tmp_path / "float.npz"), test_size=0.2))
    assert torch.equal(train.x, torch.as_tensor(channels_first[train.ids])) and train.images.dtype == np.uint8


def test_image_folder_round_trip(tmp_path):
    for name, shade in (("cat", 10), ("dog", 200)):
        for i in range(4):
            write_png(tmp_path / name / f"{i}.png", (6, 5), shade + i)
    write_png(tmp_path / "dog" / "big.png", (12, 10), 255)
    (tmp_path / "README.txt").write_text("not a class")
    train, test = load_dataset(DataSpec(source="image_folder", path=str(tmp_path), test_size=3))
    everything = sorted(zip(np.concatenate([train.ids, test.ids]), np.concatenate([train.y, test.y])))
    assert [label for _, label in everything] == [0] * 4 + [1] * 5 and train.class_names == ("cat", "dog")
    assert train.input_shape == (1, 5, 6) and train.images.shape[1:] == (5, 6)
    assert train.provenance["n_resized"] == 1 and train.provenance["ignored_files"] == ["README.txt"]
    write_png(tmp_path / "cat" / "red.png", (6, 5), (255, 0, 0), mode="RGB")
    rgb_train, _ = load_dataset(DataSpec(source="image_folder", path=str(tmp_path), test_size=3))
    assert rgb_train.input_shape == (3, 5, 6)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    arrays = write_idx_dir(tmp_path, suffix=suffix)
    train, test = load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path)))
    assert np.array_equal(train.images, arrays["train_x"]) and np.array_equal(test.y.numpy(), arrays["test_y"])
    assert train.ids.tolist() == list(range(12)) and train.class_names == FASHION_MNIST_CLASSES
    sizes = [(tmp_path / Path(f["file"]).name).stat().st_size for f in train.provenance["files"]]
    assert [entry["bytes"] for entry in train.provenance["files"]] == sizes


def test_idx_dotted_file_names(tmp_path):
    write_idx_dir(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    train, _ = load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path)))
    assert len(train) == 12


def test_image_to_input_shapes(sample):
    train, _ = sample
    assert image_to_input(Image.new("RGB", (100, 60), (10, 20, 30)), train).shape == (1, 1, 28, 28)
    assert image_to_input(np.zeros((28, 28), np.uint8), train).shape == (1, 1, 28, 28)
    assert image_to_input(np.full((5, 7, 4), 255, np.uint8), train).shape == (1, 1, 28, 28)
    assert torch.equal(image_to_input(train.images[0], train), train.x[:1])
    rgb = dataset_from_arrays(np.zeros((2, 8, 9, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    tensor = image_to_input(np.random.default_rng(0).random((30, 30)), rgb)
    assert tensor.shape == (1, 3, 8, 9) and tensor.dtype == torch.float32


# --- bad inputs ------------------------------------------------------------------------------------------------


def assert_data_error(call, *fragments: str) -> None:
    """`call()` raises DataError whose message holds every fragment."""
    with pytest.raises(DataError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.badinput
def test_missing_files(tmp_path):
    assert_data_error(lambda: load_dataset(DataSpec(source="npz", path=str(tmp_path / "nope.npz"))), "nope.npz", "not found")
    assert_data_error(lambda: load_dataset(DataSpec(source="sample", path=str(tmp_path / "gone.npz"))), "gone.npz", "build_sample")
    assert_data_error(lambda: load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path / "none"))), "none", "dataset-fashion-mnist")
    write_idx_dir(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    assert_data_error(lambda: load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path / "idx"))),
                      "t10k-labels-idx1-ubyte", "not found")
    assert_data_error(lambda: load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "pics"))), "pics", "no such folder")


@pytest.mark.badinput
def test_wrong_magic_number(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 4, 3), np.uint8), magic=2049)
    assert_data_error(lambda: load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path))), "train-images-idx3-ubyte", "2049", "2051")


@pytest.mark.badinput
@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzipped"])
def test_truncated_idx(tmp_path, suffix):
    path = write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", np.zeros((5, 4, 3), np.uint8))
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    path.write_bytes(gzip.compress(raw[:-7]) if suffix else raw[:-7])
    assert_data_error(lambda: read_idx(path, "images"), path.name, "truncated", str(16 + 60), str(16 + 53))
    path.write_bytes(path.read_bytes()[:30])
    assert_data_error(lambda: read_idx(path, "images"), path.name)


@pytest.mark.badinput
def test_idx_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    assert_data_error(lambda: load_dataset(DataSpec(source="fashion_mnist", path=str(tmp_path))), "12 images", "11 labels")


@pytest.mark.badinput
def test_npz_needing_pickle(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.zeros((4, 2, 2), np.uint8), y=np.array([0, 1, 0, 1], dtype=object))
    assert_data_error(lambda: load_dataset(DataSpec(source="npz", path=str(path))), "objects.npz", "pickle")


@pytest.mark.badinput
@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 1, 2, 3]), "class_names": np.array(["a", "b"])}, "out of range"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, -1, 0, 1])}, "negative"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 1, 0])}, "one label per image"),
        ({"x": np.zeros((4, 5), np.uint8), "y": np.array([0, 1, 0, 1])}, "shape"),
        ({"x": np.zeros((0, 2, 2), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.array([[[0.5, np.nan]]] * 4), "y": np.array([0, 1, 0, 1])}, "NaN"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0.5, 1, 0, 1])}, "integer"),
        ({"x": np.zeros((4, 2, 2), np.uint8)}, "'y'"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((1, 2, 2))}, "y_test"),
    ],
    ids=["label out of range", "negative label", "fewer labels than images", "images of the wrong shape", "empty data set",
         "NaN pixels", "fractional labels", "no labels", "x_test without y_test"],
)
def test_bad_npz(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert_data_error(lambda: load_dataset(DataSpec(source="npz", path=str(path), test_size=1)), "bad.npz", fragment)


@pytest.mark.badinput
def test_not_an_npz(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    assert_data_error(lambda: load_dataset(DataSpec(source="npz", path=str(path))),
                      f"{path}: not an npz file (no zip archive inside); save the arrays with numpy.savez")


@pytest.mark.badinput
def test_bad_image_folders(tmp_path):
    (tmp_path / "root").mkdir()
    assert_data_error(lambda: load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "root"))), "root", "no class folders")
    write_png(tmp_path / "root" / "a" / "0.png", (4, 4), 1)
    (tmp_path / "root" / "b").mkdir()
    assert_data_error(lambda: load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "root"))),
                      f"{tmp_path / 'root' / 'b'}: class folder is empty; add images or remove the folder")
    write_png(tmp_path / "root" / "b" / "0.png", (4, 4), 1)
    (tmp_path / "root" / "b" / "notes.txt").write_text("hello")
    assert_data_error(lambda: load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "root"))),
                      f"{tmp_path / 'root' / 'b' / 'notes.txt'}: not an image Pillow can read", "remove it or convert it to PNG")


@pytest.mark.badinput
def test_bad_arrays_and_uploads():
    assert_data_error(lambda: dataset_from_arrays(np.zeros((0, 3, 3)), np.zeros(0), ["a"], where="upload.npz"), "upload.npz", "empty")
    assert_data_error(lambda: dataset_from_arrays(np.full((2, 3, 3), np.inf), np.zeros(2, int), where="mine"),
                      "mine: images contain NaN or infinite values (2 examples: 0, 1); clean or drop those examples")
    like = dataset_from_arrays(np.zeros((2, 3, 3), np.uint8), np.array([0, 1]))
    assert_data_error(lambda: image_to_input(np.zeros((2, 3, 3, 3)), like), "shape")


@pytest.mark.badinput
@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"source": "mnist"}, "mnist"), ({"test_size": 1.5}, "test_size"), ({"test_size": 0}, "test_size"),
        ({"max_train": 0}, "max_train"), ({"noise_fraction": -0.1}, "noise_fraction"), ({"split_seed": -1}, "split_seed"),
        ({"source": "npz"}, "path"), ({"source": "digits", "path": "x"}, "path"), ({"max_test": 2.5}, "max_test"),
    ],
    ids=["unknown source", "test_size 1.5", "test_size 0", "max_train 0", "negative noise_fraction", "negative split_seed",
         "npz without path", "digits with path", "fractional max_test"],
)
def test_bad_spec_fields_are_named(fields, name):
    with pytest.raises(SettingsError, match=name):
        DataSpec(**fields)


@pytest.mark.badinput
def test_test_size_too_large_for_the_data():
    with pytest.raises(SettingsError, match="test_size"):
        load_dataset(DataSpec(source="digits", test_size=5000))


@pytest.mark.badinput
def test_corrupt_gzip_idx(tmp_path):
    raw = bytearray(gzip.compress(bytes(range(256)) * 100))
    raw[20:40] = b"x" * 20
    (tmp_path / "broken.gz").write_bytes(bytes(raw))
    assert_data_error(lambda: read_idx(tmp_path / "broken.gz", "images"), "broken.gz", "corrupt")


@pytest.mark.badinput
def test_one_example_cannot_be_split_but_a_given_split_of_one_each_loads(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 2, 2), np.uint8), y=np.array([0]))
    assert_data_error(lambda: load_dataset(DataSpec(source="npz", path=str(tmp_path / "one.npz"))),
                      f"{tmp_path / 'one.npz'}: holds 1 example; a train/test split needs at least 2",
                      "add examples, or give a fixed split as x_test/y_test")
    write_png(tmp_path / "pics" / "cat" / "0.png", (4, 4), 1)
    assert_data_error(lambda: load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "pics"))),
                      f"{tmp_path / 'pics'}: holds 1 example")
    np.savez(tmp_path / "given.npz", x=np.zeros((1, 2, 2), np.uint8), y=np.array([0]), x_test=np.ones((1, 2, 2), np.uint8),
             y_test=np.array([0]))
    train, test = load_dataset(DataSpec(source="npz", path=str(tmp_path / "given.npz")))
    assert (len(train), len(test)) == (1, 1)


def png_without_pixels(width: int, height: int) -> bytes:
    """A PNG of this size whose pixel data is missing: Pillow opens it (reading the size) but cannot decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    size = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", size) + chunk(b"IDAT", b"")


@pytest.mark.badinput
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not an image", "notes.png is not a readable image (not a known image format); upload a PNG or JPEG file"),
        (png_without_pixels(20, 20), "notes.png is not a readable image (image file is truncated); upload a PNG or JPEG file"),
    ],
    ids=["text file", "PNG without pixel data"],
)
def test_uploaded_file_that_is_not_an_image_is_refused_naming_it(data, message):
    with pytest.raises(DataError) as info:
        read_uploaded_image("notes.png", data)
    assert str(info.value) == message


@pytest.mark.badinput
def test_uploaded_file_over_the_size_limit_is_refused_and_the_limit_matches_the_streamlit_config():
    config = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == UPLOAD_LIMIT_MB == 5
    with pytest.raises(DataError) as info:
        read_uploaded_image("huge.png", png_without_pixels(20, 20) + bytes(6 * 2**20))
    assert str(info.value) == "huge.png is 6.0 MB; images up to 5 MB are accepted: upload a smaller PNG or JPEG"
    buffer = io.BytesIO()
    Image.new("L", (3, 2), 7).save(buffer, format="PNG")
    assert read_uploaded_image("small.png", buffer.getvalue()).size == (3, 2)


@pytest.mark.badinput
def test_uploaded_image_with_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(DataError) as info:
        read_uploaded_image("bomb.png", png_without_pixels(30_000, 30_000))
    assert str(info.value).startswith("bomb.png has too many pixels (Image size (900000000 pixels) exceeds limit")
    assert str(info.value).endswith("downscale it and upload a smaller PNG or JPEG")
    with pytest.raises(DataError) as info:  # below Pillow's own limit, above ours: refused from the header
        read_uploaded_image("large.png", png_without_pixels(5_000, 5_000))
    assert str(info.value) == "large.png has 5000x5000 pixels, more than 16,777,216; downscale it and upload a smaller PNG or JPEG"
