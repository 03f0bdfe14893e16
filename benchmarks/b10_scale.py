"""B10: TRAK at 600,000 training examples: featurizing and scoring 1,000 queries in bounded memory.

Data: Fashion-MNIST's 60,000 training images tiled ten times: copy 0 as it is, copies 1-9 flipped
left-right (odd copies) and shifted by up to 2 pixels (a crop of the zero-padded image, offsets drawn
per image from a generator seeded by the copy), written once as a float32 .npy into the benchmark's
workspace and memory-mapped. Model: MLP 784-512-512-10 trained for one epoch (SGD, lr 0.05, momentum
0.9, batch 128) on 60,000 examples drawn from the tiled set: TRAK's residual weights Q and its scores
need a model that predicts something (a random one gives p ≈ 0.1 everywhere), while the time per
example does not depend on the weights. Kronecker TRAK (k = 2048, the default block), one
checkpoint, on the CPU, with AttributionInputs.scratch in the workspace: the features, the
preconditioned features and the scores are memory-mapped there, not held in RAM. For N = 60,000 (copy
0) and 600,000: featurization alone, the whole fit (features, Q, ΦᵀΦ, preconditioning in place) and
the scores of 1,000 test queries, and the Map's layout of the training set as the app computes it
(penultimate representations, UMAP of 4,000 landmarks, every other point placed among its nearest
landmarks), each with its seconds, µs per training example and the process's
peak RSS and peak anonymous memory (RSS less the pages of mapped files, which the kernel writes back
and evicts as it needs). At 60,000 the fit and the scores are also computed in RAM, and compared.
Then the Map's figure of those positions as the app draws it (past app.components.embedding.MAX_DRAWN
points a fixed sample; one trace per class with hover texts), its JSON (what the server sends the
browser), and a box over the middle of the map chosen among all points (what a selection costs).
--smoke: 256 images tiled ten times, a 32-wide MLP, k = 64, 16 queries, 64 landmarks, no RESULTS.md.

    python benchmarks/b10_scale.py [--quick | --smoke] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import by_mode, markdown_table, parser, report, timed, workspace_root
from torch import nn
from torch.nn import functional as F

from attribution_core.data import FASHION_MNIST_DIR, Dataset, DataSpec, load_dataset
from attribution_core.inspection import LANDMARKS, landmark_layout
from attribution_core.methods.baselines import representations
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.models import mlp
from attribution_core.numerics.inputs import AttributionInputs, batches
from attribution_core.task import Task

JSON_KEYS = ("device", "data", "k", "n_queries", "rows", "scaling", "in_memory_identical", "umap_compile_seconds", "maps_drawn")
TILES = 10
BATCH = 512
SHIFT = 2  # pixels an image copy is shifted by at most, each way
DEVICE = torch.device("cpu")  # scratch arrays are memory-mapped on a CPU; on a GPU they stay in device memory


@dataclass(frozen=True)
class Scale:
    """How large a run is."""

    images: int | None  # Fashion-MNIST training images tiled (None: all 60,000)
    sizes: tuple[int, ...]  # N of the measured runs, the last one the whole tiled set
    k: int  # projection dimension
    hidden: tuple[int, ...]  # the MLP's hidden widths
    n_queries: int  # test queries scored
    train_examples: int  # examples of the tiled set the model trains on, one epoch
    landmarks: int = LANDMARKS  # rows the Map's layout runs UMAP on (the app's number in full and quick runs)


FULL = Scale(images=None, sizes=(60_000, 600_000), k=2048, hidden=(512, 512), n_queries=1000, train_examples=60_000)
QUICK = Scale(images=6_000, sizes=(6_000, 60_000), k=2048, hidden=(512, 512), n_queries=1000, train_examples=6_000)
SMOKE = Scale(images=256, sizes=(256, 2_560), k=64, hidden=(32,), n_queries=16, train_examples=256, landmarks=64)


def fashion_mnist(images: int | None) -> tuple[Dataset, Dataset, str]:
    """(train, test, note): Debian's Fashion-MNIST, or the shipped sample where it is absent."""
    if Path(FASHION_MNIST_DIR).exists():
        train, test = load_dataset(DataSpec(source="fashion_mnist", max_train=images))
        return train, test, f"Fashion-MNIST (the Debian package's files), {len(train):,} training images"
    train, test = load_dataset(DataSpec(source="sample", max_train=images))
    return train, test, f"the shipped Fashion-MNIST sample ({FASHION_MNIST_DIR} is absent), {len(train):,} training images"


def image_copy(x: torch.Tensor, copy: int) -> torch.Tensor:
    """Copy `copy` of the images (n, C, H, W): 0 as they are, others flipped left-right (odd copies) and shifted.

    The shift is a crop of the image padded by SHIFT zeros on every side, its offset drawn per image.
    """
    if copy == 0:
        return x
    flipped = x.flip(-1) if copy % 2 else x
    padded = F.pad(flipped, (SHIFT,) * 4)
    offsets = torch.randint(0, 2 * SHIFT + 1, (2, len(x)), generator=torch.Generator().manual_seed(copy))
    shifted = torch.empty_like(x)
    height, width = x.shape[-2:]
    for dy in range(2 * SHIFT + 1):
        for dx in range(2 * SHIFT + 1):
            chosen = (offsets[0] == dy) & (offsets[1] == dx)
            shifted[chosen] = padded[chosen, :, dy : dy + height, dx : dx + width]
    return shifted


def tiled_inputs(train: Dataset, root: Path) -> torch.Tensor:
    """The TILES copies of train.x, (TILES n, C, H, W) float32, memory-mapped from a .npy written once into root."""
    path = root / f"tiled-{TILES}x{len(train)}.npy"
    if not path.exists():
        temp = path.with_name(f".{path.name}.tmp")
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(TILES * len(train), *train.input_shape))
        for copy in range(TILES):  # one copy in RAM at a time
            array[copy * len(train) : (copy + 1) * len(train)] = image_copy(train.x, copy).numpy()
        array.flush()
        del array
        os.replace(temp, path)
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: writable for torch, never written


def trained_model(x: torch.Tensor, y: torch.Tensor, scale: Scale, n_classes: int) -> nn.Module:
    """The MLP after one epoch of SGD on scale.train_examples examples drawn from (x, y), seeded, in eval mode."""
    torch.manual_seed(0)
    model = mlp(tuple(x.shape[1:]), n_classes, hidden=scale.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for batch in torch.randperm(len(y))[: scale.train_examples].split(128):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class PeakMemory:
    """The process's peak RSS and peak anonymous memory (RSS less mapped files' pages) inside a block, in MB, sampled."""

    def __init__(self):
        self.peak_rss_mb = self.peak_anonymous_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def _sample(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:  # at least every 20 ms, and once more at the end
            resident, shared = (int(field) for field in Path("/proc/self/statm").read_text().split()[1:3])
            self.peak_rss_mb = max(self.peak_rss_mb, resident * page_mb)
            self.peak_anonymous_mb = max(self.peak_anonymous_mb, (resident - shared) * page_mb)
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    """One timed job at one N."""

    n: int
    job: str
    storage: str
    seconds: float
    peak_rss_mb: float
    peak_anonymous_mb: float

    @property
    def us_per_example(self) -> float:
        """Microseconds per training example."""
        return 1e6 * self.seconds / self.n

    def cells(self) -> tuple:
        """The row of the markdown table."""
        return (f"{self.n:,}", self.job, self.storage, f"{self.seconds:.1f}", f"{self.us_per_example:.1f}", f"{self.peak_rss_mb:,.0f}",
                f"{self.peak_anonymous_mb:,.0f}")


def measured(rows: list[Row], n: int, job: str, storage: str, compute: Callable[[], object]) -> object:
    """compute()'s result, its row appended (seconds, peak memory) and printed."""
    with PeakMemory() as memory, timed() as clock:
        result = compute()
    rows.append(Row(n, job, storage, clock.seconds, memory.peak_rss_mb, memory.peak_anonymous_mb))
    print(" | ".join(str(cell) for cell in rows[-1].cells()), flush=True)
    return result


def map_positions(inputs: AttributionInputs, landmarks: int) -> np.ndarray:
    """The Map's 2-D positions of the training examples, laid out as the app does: penultimate representations, landmark UMAP."""
    model, task = inputs.models[0], Task()
    rows = representations(model, task, task.representation_layer(model), batches(inputs.train_x, inputs.train_y, BATCH, DEVICE))
    return landmark_layout(rows.numpy(), landmarks=landmarks)


def map_drawn(positions: np.ndarray, labels: np.ndarray) -> dict:
    """The Map's figure of these positions as the app draws it, and a box selection among all of them: counts, seconds, MB."""
    import plotly.io

    from app.components.charts import QUALITATIVE, PointGroup, embedding_map
    from app.components.embedding import chosen_examples, drawn_mask

    with timed() as drawing:
        drawn, groups = drawn_mask(len(positions)), []
        for label in np.unique(labels):
            indices = np.flatnonzero((labels == label) & drawn)
            groups.append(PointGroup(f"class {label}", "train", indices, positions[indices], [f"train #{index}" for index in indices],
                                     colour=QUALITATIVE[int(label) % len(QUALITATIVE)]))
        sent = plotly.io.to_json(embedding_map(groups), validate=False)
    low, high = np.quantile(positions, [0.25, 0.75], axis=0)
    with timed() as selecting:
        chosen = chosen_examples({"points": [], "box": [{"x": [low[0], high[0]], "y": [low[1], high[1]]}], "lasso": []}, positions)
    row = {"n": len(positions), "drawn": int(drawn.sum()), "figure_seconds": drawing.seconds, "figure_mb": len(sent) / 2**20,
           "selected": len(chosen["train"]), "selection_seconds": selecting.seconds}
    print(f"map of {row['n']:,}: {row['drawn']:,} points drawn, {row['figure_seconds']:.2f} s, {row['figure_mb']:.1f} MB of JSON; "
          f"a box chose {row['selected']:,} in {row['selection_seconds']:.3f} s", flush=True)
    return row


def run_size(rows: list[Row], inputs: AttributionInputs, queries: tuple[torch.Tensor, torch.Tensor], scale: Scale,
             storage: str, maps: list[dict]) -> torch.Tensor:
    """Fit and score TRAK on the inputs (with a scratch directory also featurize alone, lay out the Map and draw it: maps); the
    scores (n_queries, N)."""
    method, n = Trak(TrakSettings(k=scale.k)), len(inputs.train_y)
    if inputs.scratch is not None:
        measured(rows, n, "featurize", storage, lambda: method.train_features(inputs.models[0], inputs, method.projector(inputs)))
        positions = measured(rows, n, "map layout (representations, landmark UMAP)", storage,
                             lambda: map_positions(inputs, scale.landmarks))
        maps.append(map_drawn(positions, inputs.train_y.numpy()))
    state = measured(rows, n, "fit (features, Q, ΦᵀΦ, Ψ)", storage, lambda: method.fit(inputs))
    return measured(rows, n, f"score {len(queries[1]):,} queries", storage, lambda: method.score(state, inputs, *queries))


def compile_umap() -> float:
    """Seconds of a first UMAP layout of a few rows: numba compiles UMAP then (an app worker pays it once), kept out of the map rows."""
    with timed() as clock:
        landmark_layout(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    return clock.seconds


def measure_sizes(rows: list[Row], model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], queries: tuple[torch.Tensor, torch.Tensor],
                  scale: Scale, scratch: Path, maps: list[dict]) -> bool:
    """Every size with memory-mapped arrays, then the smallest in RAM; whether the two gave identical scores.

    The run in RAM comes last, so that the heap it leaves does not raise the mapped runs' peaks.
    """
    def inputs(n: int, directory: Path | None) -> AttributionInputs:
        return AttributionInputs([model], [0.1], data[0][:n], data[1][:n], device=DEVICE, batch_size=BATCH, scratch=directory)

    reference = run_size(rows, inputs(scale.sizes[0], scratch), queries, scale, "memory-mapped", maps)
    for n in scale.sizes[1:]:
        run_size(rows, inputs(n, scratch), queries, scale, "memory-mapped", maps)
    return bool(torch.equal(reference, run_size(rows, inputs(scale.sizes[0], None), queries, scale, "in RAM", maps)))


def scaling_rows(rows: list[Row], small: int, large: int) -> list[tuple]:
    """Per job with scratch: µs per example at the smallest and largest N and their ratio (1.0: linear)."""
    by_key = {(row.n, row.job): row for row in rows if row.storage == "memory-mapped"}
    jobs = dict.fromkeys(row.job for row in rows if row.storage == "memory-mapped")
    return [(job, f"{by_key[small, job].us_per_example:.1f}", f"{by_key[large, job].us_per_example:.1f}",
             by_key[large, job].us_per_example / by_key[small, job].us_per_example) for job in jobs]


def describe(rows: list[Row], scale: Scale, train: Dataset, data_note: str, identical: bool, maps: list[dict]) -> str:
    """The RESULTS.md section's body: the setting, the table of jobs and the per-example cost at the smallest and largest N."""
    small, large = scale.sizes[0], scale.sizes[-1]
    features_mb, scores_mb = large * scale.k * 4 / 2**20, scale.n_queries * large * 4 / 2**20
    widths = "-".join(str(width) for width in (np.prod(train.input_shape), *scale.hidden, train.n_classes))
    return (
        f"Device: {DEVICE}. Data: {data_note}, tiled {TILES} times ({large:,} examples, "
        f"{large * np.prod(train.input_shape) * 4 / 2**20:,.0f} MB memory-mapped). Model: MLP {widths}, one epoch on "
        f"{scale.train_examples:,} examples. Kronecker TRAK, k = {scale.k}, one checkpoint, batch {BATCH}; {scale.n_queries:,} "
        f"test queries. At N = {large:,} the features (N·k·4 bytes) are {features_mb:,.0f} MB and the scores {scores_mb:,.0f} MB, "
        "memory-mapped in the workspace's scratch directory (AttributionInputs.scratch). Peak memory: the whole process "
        "during the job, RSS and its anonymous part (RSS less the resident pages of mapped files: the data, features and "
        "scores, which the kernel writes back and evicts under memory pressure).\n\n"
        + markdown_table(["N", "job", "arrays", "seconds", "µs / training example", "peak RSS MB", "peak anonymous MB"],
                         [row.cells() for row in rows])
        + f"\n\nCost per training example, memory-mapped, N = {small:,} against N = {large:,} (1.0: linear):\n\n"
        + markdown_table(["job", f"µs / example at {small:,}", f"µs / example at {large:,}", "ratio"], scaling_rows(rows, small, large))
        + f"\n\nAt N = {small:,}, the scores from memory-mapped arrays are {'identical to' if identical else 'NOT identical to'} "
        "those computed in RAM.\n\nThe Map drawn as the app draws it (a fixed sample past the drawing limit; one trace per class), "
        "and a box over the middle half of each axis chosen among all of the points:\n\n"
        + markdown_table(["N", "points drawn", "figure and its JSON, seconds", "JSON MB", "box: examples chosen", "box, seconds"],
                         [(f"{row['n']:,}", f"{row['drawn']:,}", f"{row['figure_seconds']:.2f}", f"{row['figure_mb']:.1f}",
                           f"{row['selected']:,}", f"{row['selection_seconds']:.3f}") for row in maps])
    )


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    scale = by_mode(args, full=FULL, quick=QUICK, smoke=SMOKE)
    train, test, data_note = fashion_mnist(scale.images)
    queries = (test.x[: scale.n_queries], test.y[: scale.n_queries])
    rows: list[Row] = []
    maps: list[dict] = []
    with workspace_root(args.workspace) as root:
        x, y = tiled_inputs(train, root), train.y.repeat(TILES)
        model = trained_model(x, y, scale, train.n_classes)
        compile_seconds = compile_umap()
        identical = measure_sizes(rows, model, (x, y), queries, scale, root / "scratch", maps)
    payload = {"device": str(DEVICE), "data": data_note, "k": scale.k, "n_queries": scale.n_queries,
               "rows": [{"n": row.n, "job": row.job, "storage": row.storage, "seconds": row.seconds,
                         "us_per_example": row.us_per_example, "peak_rss_mb": row.peak_rss_mb,
                         "peak_anonymous_mb": row.peak_anonymous_mb} for row in rows],
               "scaling": [{"job": job, "us_small": float(a), "us_large": float(b), "ratio": ratio}
                           for job, a, b, ratio in scaling_rows(rows, scale.sizes[0], scale.sizes[-1])],
               "in_memory_identical": identical, "umap_compile_seconds": compile_seconds, "maps_drawn": maps}
    compiled = f"\n\nUMAP's first use (numba compiling it) took {compile_seconds:.0f} s before the map rows."
    body = describe(rows, scale, train, data_note, identical, maps) + compiled
    report("b10", "B10 · TRAK at 600,000 training examples", body, args, payload)


if __name__ == "__main__":
    main()
