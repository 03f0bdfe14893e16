"""Build sample_data/fashion_mnist_sample.npz: a balanced, seeded subset of the Fashion-MNIST IDX files.

    python sample_data/build_sample.py --source-dir /usr/share/datasets/fashion-mnist
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from attribution_core.data import FASHION_MNIST_CLASSES, file_record, find_idx_files, read_idx_pair

DEFAULT_OUT = Path(__file__).resolve().parent / "fashion_mnist_sample.npz"


def balanced_choice(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: `per_class` rows drawn without replacement from each class."""
    chosen = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise SystemExit(f"class {label} has only {len(rows)} examples, fewer than --per-class {per_class}")
        chosen.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def build(source_dir: Path, out: Path, per_class_train: int, per_class_test: int, seed: int) -> dict[str, np.ndarray]:
    """Draw the sample and write it with np.savez_compressed; returns the saved arrays."""
    files = find_idx_files(source_dir)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = read_idx_pair(*files[split])
        rows = balanced_choice(labels, per_class, rng)
        arrays |= {f"x_{split}": images[rows], f"y_{split}": labels[rows], f"ids_{split}": rows}
    built_from = {
        "dataset": "Fashion-MNIST (Zalando Research, MIT licence)",
        "files": [{**file_record(path), "file": path.name} for pair in files.values() for path in pair],
        "per_class_train": per_class_train, "per_class_test": per_class_test, "seed": seed,
        "ids": "row index in the source IDX file of the same split",
    }
    arrays["class_names"] = np.array(FASHION_MNIST_CLASSES)
    arrays["built_from"] = np.array(json.dumps(built_from))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the four Fashion-MNIST IDX files (plain or .gz)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument("--per-class-train", type=int, default=600)
    parser.add_argument("--per-class-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = build(args.source_dir, args.out, args.per_class_train, args.per_class_test, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): "
          f"{len(arrays['y_train'])} train, {len(arrays['y_test'])} test images")


if __name__ == "__main__":
    main()
