"""Seeded random projections of per-example gradients, and featurizing a data set with them.

A projector maps the captured layers of a batch (list[LayerBatch], see gradients.py) to features
(B, k) ≈ Pᵀ ∇θ for a random P (n_params x k) with E[‖Pᵀv‖²] = ‖v‖². No projector stores P:
- `KroneckerProjector`: per layer, blocks P_out ⊗ P_in (small seeded factors) applied to the
  layer gradient Σ_t g_t a_tᵀ as Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ: no per-example gradient is formed
  (the idea behind LoGra, Choe et al. 2024). Block size 1 makes every feature an independent
  rank-one projection u_jᵀ G v_j, as accurate as a dense P; TRAK's default, block 9 (3 x 3),
  does a third of its work at the same LDS as block 4 (benchmarks/RESULTS.md, B3).
- `DenseProjector`: a dense Rademacher/Gaussian P over the flattened gradient in the core's
  parameter layout, its rows regenerated from the seed chunk by chunk (the slow baseline, O(P k)).
- `IdentityProjector`: no projection (k = n_params), for exact checks on small models.

Random matrices are drawn on the CPU from generators seeded by (seed, layer, part) and then moved
to the inputs' device and dtype, so the same seed gives the same features on every device: a
state fitted on a GPU can be scored on a CPU.

Projecting a whole data set chunk by chunk (and sharded over ranks) is projected_gradients.py.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SettingsError
from ..task import Task
from .gradients import LayerBatch, layer_shape, per_example_gradients

PROJECTIONS = ("kronecker", "dense", "identity")
DISTRIBUTIONS = ("rademacher", "gaussian")

LayerShapes = dict[str, tuple[int, int]]
"""Tracked layers in tracking order: name -> (d_out, d_in) in the core's layout (bias as a column)."""


def tracked_layer_shapes(model: nn.Module, task: Task) -> LayerShapes:
    """(d_out, d_in) of every layer the task tracks, in tracking order."""
    return {name: layer_shape(module) for name, module in task.tracked_modules(model).items()}


def random_matrix(key: tuple[int, ...], rows: int, cols: int, kind: str, like: torch.Tensor) -> torch.Tensor:
    """(rows, cols) matrix of i.i.d. ±1 (rademacher) or N(0, 1) (gaussian) entries, fixed by key.

    Drawn on the CPU (device-independent) and returned on like's device and dtype.
    """
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        matrix = torch.randn(rows, cols, generator=generator)
    else:
        matrix = torch.empty(rows, cols).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    return matrix.to(device=like.device, dtype=like.dtype)


def _checked_kind(kind: str) -> str:
    if kind not in DISTRIBUTIONS:
        raise SettingsError(f"projection kind {kind!r}: choose one of {DISTRIBUTIONS}")
    return kind


class Projector(ABC):
    """Maps a batch's captured layers to (B, k) gradient features, the same for the same seed."""

    def __init__(self, layer_shapes: LayerShapes, k: int):
        if not layer_shapes:
            raise SettingsError("no tracked layers: Task.tracked_modules returned none")
        self.layer_shapes = dict(layer_shapes)
        self.n_params = sum(d_out * d_in for d_out, d_in in self.layer_shapes.values())
        self.k = k

    def project(self, layers: list[LayerBatch], out: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, k) of the per-example gradients the layers describe, written into out if given.

        Without out they come in the layers' dtype. Writing into a preallocated (N, k) block spares a
        fresh (B, k) buffer and a copy per batch: on a CPU, fresh buffers cost page faults.
        """
        self._check_layers(layers)
        if out is None:
            out = layers[0].output_grads.new_empty(layers[0].output_grads.shape[0], self.k)
        self._project_into(layers, out)
        return out

    @abstractmethod
    def _project_into(self, layers: list[LayerBatch], out: torch.Tensor) -> None:
        """Write the (B, k) features of the checked layers into out."""

    def _check_layers(self, layers: list[LayerBatch]) -> None:
        names = [layer.name for layer in layers]
        if names != list(self.layer_shapes):
            raise SettingsError(f"projector built for layers {list(self.layer_shapes)} got layers {names}")


class IdentityProjector(Projector):
    """No projection: the flattened per-example gradient itself (k = n_params; small models only)."""

    def __init__(self, layer_shapes: LayerShapes):
        super().__init__(layer_shapes, k=0)
        self.k = self.n_params

    def _project_into(self, layers: list[LayerBatch], out: torch.Tensor) -> None:
        """The per-example gradients (B, n_params) in the core's parameter layout."""
        out.copy_(per_example_gradients(layers))


@dataclass(frozen=True)
class LayerSplit:
    """How one layer's k_layer features are drawn: `blocks` Kronecker blocks of k_out x k_in each."""

    k_out: int
    k_in: int
    blocks: int
    k_layer: int


def kronecker_split(layer_shapes: LayerShapes, k: int, block: int = 1) -> dict[str, LayerSplit]:
    """Per layer, its share k_layer of the k features and the shape of its Kronecker blocks.

    k is split over layers in proportion to their parameter counts (largest remainders, at least
    one feature per layer), so the k_layer sum to exactly k. A layer's features come in blocks
    of at most `block` features (0: one block of k_layer), each block the k_out x k_in products
    of its own P_out (d_out, k_out) and P_in (d_in, k_in), with k_out / k_in near d_in / d_out
    (the cheapest shape: see _layer_split), k_out <= d_out and k_in <= d_in; the first k_layer
    products, block by block, are kept.
    """
    sizes = {name: d_out * d_in for name, (d_out, d_in) in layer_shapes.items()}
    n_params = sum(sizes.values())
    if not len(sizes) <= k <= n_params:
        raise SettingsError(
            f"k={k}: a Kronecker projection needs between {len(sizes)} (one per tracked layer) and "
            f"{n_params} (the tracked parameters) features; use projection='identity' for all of them"
        )
    if block < 0:
        raise SettingsError(f"block={block}: give features per Kronecker block (>= 1), or 0 for one block per layer")
    shares = {name: k * size / n_params for name, size in sizes.items()}
    counts = {name: math.floor(share) for name, share in shares.items()}
    by_remainder = sorted(sizes, key=lambda name: shares[name] - counts[name], reverse=True)
    for name in by_remainder[: k - sum(counts.values())]:
        counts[name] += 1
    for name in [name for name, count in counts.items() if count == 0]:  # every layer gets a feature
        counts[max(counts, key=counts.get)] -= 1
        counts[name] = 1
    return {name: _layer_split(layer_shapes[name], counts[name], block) for name in sizes}


def _layer_split(shape: tuple[int, int], k_layer: int, block: int) -> LayerSplit:
    d_out, d_in = shape
    per_block = k_layer if block == 0 else min(block, k_layer)
    # k_out / k_in near d_in / d_out: projecting a and g then costs about the same, d_in k_l / k_out
    # and d_out k_l / k_in per position, and their sum is smallest for the block size.
    k_out = min(d_out, max(1, math.ceil(math.sqrt(per_block * d_in / d_out))))
    k_in = min(d_in, math.ceil(per_block / k_out))
    k_out = math.ceil(per_block / k_in)  # grows back where k_in hit d_in
    return LayerSplit(k_out, k_in, math.ceil(k_layer / (k_out * k_in)), k_layer)


class KroneckerProjector(Projector):
    """Kronecker-structured projection applied to a and g: no per-example gradient is formed.

    Layer l's gradient G = Σ_t g_t a_tᵀ (d_out, d_in) is projected by blocks j = 1..r as
    vec(P_out,jᵀ G P_in,j) = (P_out,j ⊗ P_in,j)ᵀ vec(G), P_out,j (d_out, k_out) and P_in,j
    (d_in, k_in) i.i.d. ±1 or N(0, 1). Features are ordered (column i of P_out,j, column i' of
    P_in,j, block j), block fastest; the first k_l, divided by √k_l, are kept. Each feature has
    E[feature²] = ‖G‖², so E[‖features‖²] = ‖∇θ‖².

    block trades speed for accuracy: features of one block share their factors, so a dot product
    of projected gradients has a variance growing like k_out + k_in. block=1 (independent
    rank-one features u_jᵀ G v_j) is as accurate as a dense projection at a per-position cost of
    k_l (d_out + d_in); block=4 costs about half of that and for a wide layer (d_in >> d_out) a
    quarter, with LDS within 0.01 of dense at equal k; block=9 (TRAK's default) a third, at block
    4's LDS on the demo runs (a variance of 6 against 4 is within the projection seed's spread there;
    block 16 lost 0.008 at k = 2048: benchmarks/RESULTS.md, B3);
    block=0 (one P_out ⊗ P_in per layer, LoGra) costs only d_out k_out + d_in k_in + k_l but needs
    a larger k for the same accuracy.
    """

    def __init__(
        self,
        layer_shapes: LayerShapes,
        k: int,
        seed: int = 0,
        kind: str = "rademacher",
        block: int = 1,
        rotations: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        super().__init__(layer_shapes, k)
        self.seed, self.kind, self.block = seed, _checked_kind(kind), block
        self.split = kronecker_split(self.layer_shapes, k, block)
        self.rotations = dict(rotations or {})
        self._factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rotated(self, rotations: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> "KroneckerProjector":
        """The same random features taken in a rotated basis: per layer (Q_out, Q_in), G is projected as Q_outᵀ G Q_in.

        The factors become Q_out P_out and Q_in P_in, so projecting the rotated gradient from a and g
        costs no more than the plain projection (projected EK-FAC / SOURCE scoring, curvature.py).
        """
        return KroneckerProjector(self.layer_shapes, self.k, self.seed, self.kind, self.block, rotations)

    def factors(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out (d_out, k_out r), P_in (d_in, k_in r)) of a layer's r blocks, unscaled; block j's columns are j, r + j, 2r + j, ..."""
        cache_key = (name, like.device, like.dtype)
        if cache_key not in self._factors:  # small (d x r k_factor), so kept per device and dtype
            index = list(self.layer_shapes).index(name)
            (d_out, d_in), split = self.layer_shapes[name], self.split[name]
            p_out = random_matrix((self.seed, index, 0), d_out, split.k_out * split.blocks, self.kind, like)
            p_in = random_matrix((self.seed, index, 1), d_in, split.k_in * split.blocks, self.kind, like)
            if name in self.rotations:
                q_out, q_in = self.rotations[name]
                p_out, p_in = q_out.to(p_out) @ p_out, q_in.to(p_in) @ p_in
            self._factors[cache_key] = (p_out, p_in)
        return self._factors[cache_key]

    def project_matrices(self, matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features (n, k) of whole layer gradients (n, d_out, d_in) per tracked layer: the map `project` applies to Σ_t g_t a_tᵀ."""
        if list(matrices) != list(self.layer_shapes):
            raise SettingsError(f"projector built for layers {list(self.layer_shapes)} got layers {list(matrices)}")
        parts = []
        for name, matrix in matrices.items():
            p_out, p_in = self.factors(name, matrix)
            split, (n, d_out, _) = self.split[name], matrix.shape
            right = (matrix @ p_in).view(n, d_out, split.k_in, split.blocks)
            products = torch.einsum("oib,nojb->nijb", p_out.view(d_out, split.k_out, split.blocks), right)
            parts.append(products.reshape(n, -1)[:, : split.k_layer] / math.sqrt(split.k_layer))
        return torch.cat(parts, dim=1)

    def _project_into(self, layers: list[LayerBatch], out: torch.Tensor) -> None:
        """Each layer's features into its columns of out, layers in tracking order."""
        offset = 0
        for layer in layers:
            k_layer = self.split[layer.name].k_layer
            self._project_layer(layer, out[:, offset : offset + k_layer])
            offset += k_layer

    def _project_layer(self, layer: LayerBatch, out: torch.Tensor) -> None:
        """The layer's k_layer features into out, ordered (i, j, block): P_out,blockᵀ G P_in,block at (i, j)."""
        p_out, p_in = self.factors(layer.name, layer.output_grads)
        split = self.split[layer.name]
        n, positions = layer.output_grads.shape[:2]
        # The block index is the innermost (fastest) axis of both projections, so the products
        # below broadcast over long contiguous rows: with the block index outermost, the
        # (.., 2, 1) x (.., 1, 2) products of small blocks ran 15x slower than the matmuls' memory traffic.
        if positions == 1:
            projected_grads = (layer.output_grads[:, 0] @ p_out).view(n, split.k_out, 1, split.blocks)
            projected_inputs = layer.project_inputs(p_in)[:, :, 0].view(n, 1, split.k_in, split.blocks)
            products = projected_grads * projected_inputs  # (n, k_out, k_in, blocks)
        else:  # (k, d) @ (n, d, T): convolution captures are channels-first; their patches are never formed
            projected_grads = torch.matmul(p_out.T, layer.output_grads.transpose(1, 2)).view(n, split.k_out, split.blocks, positions)
            projected_inputs = layer.project_inputs(p_in).reshape(n, split.k_in, split.blocks, positions)
            if split.k_out == split.k_in == 1:  # independent rank-one features: a product summed over positions
                products = (projected_grads * projected_inputs).sum(dim=3)
            else:  # (n, blocks, k_out, T) @ (n, blocks, T, k_in), back to (n, k_out, k_in, blocks)
                products = (projected_grads.transpose(1, 2) @ projected_inputs.permute(0, 2, 3, 1)).permute(0, 2, 3, 1)
        torch.mul(products.reshape(n, -1)[:, : split.k_layer], 1 / math.sqrt(split.k_layer), out=out)


class DenseProjector(Projector):
    """Dense Pᵀ∇θ / √k over the flattened gradient, P regenerated row block by row block.

    Row r of P (parameter r in the core's layout) is fixed by (seed, layer, weight-matrix row),
    so features do not depend on `chunk`: the number of parameters whose per-example gradients
    (B, chunk) and random rows (chunk, k) are held at a time.
    """

    def __init__(self, layer_shapes: LayerShapes, k: int, seed: int = 0, kind: str = "rademacher", chunk: int = 65536):
        super().__init__(layer_shapes, k)
        if k < 1 or chunk < 1:
            raise SettingsError(f"dense projection: k={k} and chunk={chunk} must be at least 1")
        self.seed, self.kind, self.chunk = seed, _checked_kind(kind), chunk

    def _project_into(self, layers: list[LayerBatch], out: torch.Tensor) -> None:
        """Pᵀ∇θ / √k into out, accumulated row block by row block."""
        like = layers[0].inputs
        out.zero_()
        for index, layer in enumerate(layers):
            d_out, d_in = self.layer_shapes[layer.name]
            rows_per_step = max(1, self.chunk // d_in)
            for start in range(0, d_out, rows_per_step):
                stop = min(start + rows_per_step, d_out)
                gradients = torch.einsum("bto,bti->boi", layer.output_grads[:, :, start:stop], layer.inputs)
                out += gradients.flatten(1) @ self._rows(index, start, stop, d_in, like)
        out /= math.sqrt(self.k)

    def _rows(self, index: int, start: int, stop: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
        """P's rows for weight-matrix rows start..stop of layer `index`: ((stop - start) d_in, k)."""
        return torch.cat([random_matrix((self.seed, index, row), d_in, self.k, self.kind, like) for row in range(start, stop)])


def make_projector(
    projection: str,
    layer_shapes: LayerShapes,
    k: int,
    *,
    seed: int = 0,
    kind: str = "rademacher",
    block: int = 1,
    chunk: int = 65536,
) -> Projector:
    """The projector named by `projection` (kronecker, dense or identity; identity ignores k)."""
    if projection == "kronecker":
        return KroneckerProjector(layer_shapes, k, seed, kind, block)
    if projection == "dense":
        return DenseProjector(layer_shapes, k, seed, kind, chunk)
    if projection == "identity":
        return IdentityProjector(layer_shapes)
    raise SettingsError(f"projection {projection!r}: choose one of {PROJECTIONS}")


