"""Per-example gradient information from layer structure, without per-example gradients.

For a Linear or Conv2d layer, the gradient of example b's loss w.r.t. the weight matrix
W (d_out x d_in, bias as the last column) is the sum over positions t of the outer product
g_bt a_btᵀ, where a are the layer's inputs (unfolded patches for convolutions, a ones column
for the bias) and g the gradients w.r.t. the layer's outputs. One batched forward and backward
of the summed per-example losses yields a and g for every example; methods then reduce them
(project, fold into Kronecker factors, dot with queries) instead of forming W-sized gradients.

Parameter layout used everywhere in the core: per tracked layer, in `Task.tracked_modules`
order, the (d_out, d_in) matrix [W.reshape(d_out, -1) | b], flattened row-major.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F

from ..errors import SettingsError
from ..task import Task


@dataclass
class ConvInput:
    """A convolution's input (B, C, H, W) before patches are formed: projections can convolve it directly."""

    module: nn.Conv2d
    x: torch.Tensor

    def formed(self) -> torch.Tensor:
        """The (B, T, d_in) patches (conv_patches)."""
        return conv_patches(self.module, self.x)

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrixᵀ a_t at every position, (B, m, T), for matrix (d_in, m): one convolution, no patches formed."""
        module, d_patch = self.module, self.module.weight[0].numel()
        kernels = matrix[:d_patch].T.reshape(matrix.shape[1], *module.weight.shape[1:])
        bias = matrix[d_patch] if module.bias is not None else None
        projected = F.conv2d(self.x, kernels, bias, module.stride, _conv_padding(module), module.dilation)
        return projected.flatten(2)

    def float(self) -> "ConvInput":
        """The same input in float32."""
        return ConvInput(self.module, self.x.float())


@dataclass
class LinearInput:
    """A linear layer's input (B, T, d) before the bias column of ones is appended: projections add the bias row instead."""

    x: torch.Tensor
    bias: bool

    def formed(self) -> torch.Tensor:
        """The (B, T, d_in) inputs, a column of ones appended for the bias."""
        if not self.bias:
            return self.x
        return torch.cat([self.x, self.x.new_ones(self.x.shape[:-1] + (1,))], dim=-1)

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrixᵀ a_t at every position, (B, m, T), for matrix (d_in, m): the bias row added by addmm, no ones column copied."""
        n, positions, d = self.x.shape
        rows = self.x.reshape(n * positions, d)
        projected = torch.addmm(matrix[d], rows, matrix[:d]) if self.bias else rows @ matrix
        return projected.view(n, positions, -1).transpose(1, 2)

    def float(self) -> "LinearInput":
        """The same input in float32."""
        return LinearInput(self.x.float(), self.bias)


UnformedInput = ConvInput | LinearInput
"""A captured layer input whose (B, T, d_in) matrix is formed only when asked for."""


class LayerBatch:
    """Inputs and output gradients of one layer for one batch.

    inputs: (B, T, d_in) layer inputs (conv: unfolded patches; bias column of ones appended),
        formed on first use from the captured input (unformed_input); project_inputs never forms them.
    output_grads: (B, T, d_out) gradients of the summed per-example objective w.r.t. outputs.
    """

    def __init__(self, name: str, inputs: torch.Tensor | UnformedInput, output_grads: torch.Tensor):
        self.name = name
        self._inputs = inputs
        self.output_grads = output_grads

    @property
    def inputs(self) -> torch.Tensor:
        """(B, T, d_in), formed (once) if needed."""
        if isinstance(self._inputs, UnformedInput):
            self._inputs = self._inputs.formed()
        return self._inputs

    @property
    def unformed_input(self) -> UnformedInput | None:
        """The captured input while its (B, T, d_in) matrix has not been formed, else None."""
        return self._inputs if isinstance(self._inputs, UnformedInput) else None

    def project_inputs(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrixᵀ a_t for every example and position, (B, m, T), for matrix (d_in, m); an unformed input stays unformed."""
        unformed = self.unformed_input
        return unformed.project(matrix) if unformed is not None else (self._inputs @ matrix).transpose(1, 2)

    def float(self) -> "LayerBatch":
        """The same layer in float32 (inputs still unformed where they were)."""
        return LayerBatch(self.name, self._inputs.float(), self.output_grads.float())

    def per_example_gradients(self) -> torch.Tensor:
        """Per-example weight gradients (B, d_out, d_in): only for small layers and tests."""
        return torch.einsum("bto,bti->boi", self.output_grads, self.inputs)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding_mode != "zeros" or module.groups != 1:
        raise SettingsError(
            f"layer {module!r}: only zero-padded, ungrouped Conv2d layers can be tracked; "
            "exclude it in Task.tracked_modules"
        )
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))  # type: ignore[return-value]
    return module.padding  # type: ignore[return-value]


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, T, d_in) input patches of a convolution, bias row of ones included: a transposed view.

    The (C_in, kh, kw) order of a patch matches weight.reshape(d_out, -1). The storage stays
    channels-first (B, d_in, T), as F.unfold makes it: consumers that multiply from the left
    need no transposing copy. (The Kronecker projection needs no patches: ConvInput.project.)
    """
    patches = F.unfold(x, module.kernel_size, module.dilation, _conv_padding(module), module.stride)
    if module.bias is not None:
        patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1, patches.shape[2])], dim=1)
    return patches.transpose(1, 2)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> UnformedInput:
    """The captured input whose (B, T, d_in) matrix a, outer-multiplied with output gradients, gives weight gradients (formed lazily)."""
    if isinstance(module, nn.Conv2d):
        _conv_padding(module)  # unsupported convolutions fail at capture time
        return ConvInput(module, x)
    if not isinstance(module, nn.Linear):
        raise SettingsError(f"cannot track layer {module!r}: only nn.Linear and nn.Conv2d are supported")
    return LinearInput(x.reshape(x.shape[0], -1, x.shape[-1]), module.bias is not None)


def _flatten_output_grads(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return grad.flatten(2).transpose(1, 2)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1])


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the layer's weight matrix in the core's layout (bias as a column)."""
    weight = module.weight
    d_in = weight[0].numel() + (1 if module.bias is not None else 0)
    return weight.shape[0], d_in


class LayerCapture:
    """Context manager recording the inputs of the given layers and where their outputs enter autograd.

    `backward(total)` then computes the gradients of total w.r.t. those outputs only: autograd
    skips every parameter gradient (a third of a training step's work) and nothing touches .grad.
    Outputs are identified by their gradient edges taken in the forward hook, so an in-place
    operation after the layer (ReLU(inplace=True)) does not redirect the gradient to its result.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self._inputs: dict[str, UnformedInput] = {}
        self._edges: dict[str, tuple[nn.Module, GradientEdge]] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._inputs[name] = layer_inputs(module, args[0].detach())
            if output.requires_grad:
                self._edges[name] = (module, get_gradient_edge(output))

        return hook

    def backward(self, total: torch.Tensor) -> list[LayerBatch]:
        """Gradients of the scalar total w.r.t. the recorded outputs: the captured layers, in tracking order."""
        missing = [name for name in self.modules if name not in self._edges]
        if missing:
            raise RuntimeError(f"no gradient reached layers {missing}: are they used in the forward pass?")
        edges = [self._edges[name][1] for name in self.modules]
        grads = torch.autograd.grad(total, edges, allow_unused=True)
        unused = [name for name, grad in zip(self.modules, grads) if grad is None]
        if unused:
            raise RuntimeError(f"no gradient reached layers {unused}: does the objective depend on them?")
        batches = [
            LayerBatch(name, self._inputs[name], _flatten_output_grads(self._edges[name][0], grad))
            for name, grad in zip(self.modules, grads)
        ]
        self._inputs, self._edges = {}, {}
        return batches


def capture_layer_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> list[LayerBatch]:
    """One forward and backward of objective(model, x, y).sum(); returns each layer's a and g."""
    with LayerCapture(modules) as capture, torch.enable_grad():
        return capture.backward(objective(model, x, y).sum())


def per_example_gradients(layers: list[LayerBatch]) -> torch.Tensor:
    """Flattened per-example gradients (B, P) in the core's parameter layout: small models only."""
    return torch.cat([layer.per_example_gradients().flatten(1) for layer in layers], dim=1)


OBJECTIVES = ("loss", "measurement")
AMP_DTYPES = ("bfloat16", "float16")


def objective_function(task: Task, objective: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task's per-example training loss or measurement, by name."""
    if objective not in OBJECTIVES:
        raise SettingsError(f"objective {objective!r}: choose one of {OBJECTIVES}")
    return task.train_loss if objective == "loss" else task.measurement


def autocast_dtype(amp_dtype: str | None) -> torch.dtype | None:
    """The torch dtype of a mixed-precision setting (None: full precision)."""
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise SettingsError(f"amp_dtype {amp_dtype!r}: choose None or one of {AMP_DTYPES}")
    return None if amp_dtype is None else getattr(torch, amp_dtype)


def capture_mixed_precision(
    model: nn.Module, modules: dict[str, nn.Module], function: Callable, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> list[LayerBatch]:
    """a and g from a forward and backward under autocast to dtype, returned in float32 for fp32 accumulation."""
    with torch.autocast(x.device.type, dtype=dtype):
        layers = capture_layer_batches(model, modules, function, x, y)
    return [layer.float() for layer in layers]


def layer_batches(
    model: nn.Module,
    task: Task,
    objective: str,
    chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    amp_dtype: str | None = None,
) -> Iterator[tuple[int, list[LayerBatch]]]:
    """(start, captured layers) per chunk: a and g of the tracked layers for the objective's gradient.

    amp_dtype ("bfloat16", "float16") runs the forward and backward in mixed precision.
    """
    modules = task.tracked_modules(model)
    function = objective_function(task, objective)
    dtype = autocast_dtype(amp_dtype)
    for start, x, y in chunks:
        if dtype is None:
            yield start, capture_layer_batches(model, modules, function, x, y)
        else:
            yield start, capture_mixed_precision(model, modules, function, x, y, dtype)
