"""A data set's projected gradients: features (N, k) from a projector, chunk by chunk, sharded over ranks."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..distributed import sharded_rows
from ..task import Task
from .gradients import layer_batches
from .inputs import AttributionInputs, batches
from .projection import Projector


def projected_features(
    models: Sequence[nn.Module],
    inputs: AttributionInputs,
    projector: Projector,
    objective: str,
    on_chunk: Callable[[], None] = lambda: None,
    amp_dtype: str | None = None,
) -> torch.Tensor:
    """The projected objective gradient of every training example, averaged over the models: (N, k).

    Each model's gradients are taken on its view of the training inputs (inputs.train_view). The
    features are written into inputs.result_array: memory-mapped where inputs.scratch says so.

    Under torch.distributed each rank projects its index range and the ranges are all-gathered.
    """
    def shard(rows: slice) -> torch.Tensor:
        total = inputs.result_array(rows.stop - rows.start, projector.k)
        for index, model in enumerate(models):
            chunks = batches(inputs.train_view(model)[rows], inputs.train_y[rows], inputs.batch_size, inputs.device)
            project_gradients(model, inputs.task, projector, objective, chunks, len(total), on_chunk, amp_dtype, out=total, add=index > 0)
        return total.div_(len(models)) if len(models) > 1 else total

    return sharded_rows(len(inputs.train_y), shard)


def project_gradients(
    model: nn.Module,
    task: Task,
    projector: Projector,
    objective: str,
    chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    n_examples: int,
    on_chunk: Callable[[], None] = lambda: None,
    amp_dtype: str | None = None,
    *,
    out: torch.Tensor | None = None,
    add: bool = False,
) -> torch.Tensor:
    """Projected per-example gradients of the objective, (n_examples, k) float32 on the chunks' device.

    The chunks' starts index the rows, which are filled in place: no list of per-chunk features
    is held beside the result. out: the (n_examples, k) array to fill (default: a new one), or
    with add=True to add the features to.
    """
    for start, layers in layer_batches(model, task, objective, chunks, amp_dtype):
        if out is None:
            out = torch.empty(n_examples, projector.k, device=layers[0].output_grads.device)
        rows = out[start : start + layers[0].output_grads.shape[0]]
        if add:
            rows += projector.project(layers)
        else:
            projector.project(layers, out=rows)
        on_chunk()
    return out if out is not None else torch.empty(0, projector.k)
