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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import SettingsError


@dataclass
class LayerBatch:
    """Inputs and output gradients of one layer for one batch.

    inputs: (B, T, d_in) layer inputs (conv: unfolded patches; bias column of ones appended).
    output_grads: (B, T, d_out) gradients of the summed per-example objective w.r.t. outputs.
    """

    name: str
    inputs: torch.Tensor
    output_grads: torch.Tensor

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


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, T, d_in) matrix a whose outer products with output gradients give weight gradients."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, _conv_padding(module), module.stride)
        inputs = patches.transpose(1, 2)
    elif isinstance(module, nn.Linear):
        inputs = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        raise SettingsError(f"cannot track layer {module!r}: only nn.Linear and nn.Conv2d are supported")
    if module.bias is not None:
        inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[:-1] + (1,))], dim=-1)
    return inputs


def _flatten_output_grads(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return grad.flatten(2).transpose(1, 2)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1])


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the layer's weight matrix in the core's layout (bias as a column)."""
    weight = module.weight
    d_in = weight[0].numel() + (1 if module.bias is not None else 0)
    return weight.shape[0], d_in


def parameter_matrix(module: nn.Module, use_grad: bool = False) -> torch.Tensor:
    """The layer's weights (or their .grad) as the (d_out, d_in) matrix [W | b]."""
    weight = module.weight.grad if use_grad else module.weight
    columns = [weight.reshape(weight.shape[0], -1)]
    if module.bias is not None:
        columns.append((module.bias.grad if use_grad else module.bias)[:, None])
    return torch.cat(columns, dim=1)


class LayerCapture:
    """Context manager recording inputs and output gradients of the given layers."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
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
                output.register_hook(lambda grad: self._grads.__setitem__(name, _flatten_output_grads(module, grad)))

        return hook

    def layers(self) -> list[LayerBatch]:
        """The captured layers of the last forward/backward, in tracking order."""
        missing = [name for name in self.modules if name not in self._grads]
        if missing:
            raise RuntimeError(f"no gradient reached layers {missing}: are they used in the forward pass?")
        batches = [LayerBatch(name, self._inputs[name], self._grads[name]) for name in self.modules]
        self._inputs, self._grads = {}, {}
        return batches


def capture_layer_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> list[LayerBatch]:
    """One forward and backward of objective(model, x, y).sum(); returns each layer's a and g."""
    model.zero_grad(set_to_none=True)
    with LayerCapture(modules) as capture:
        with torch.enable_grad():
            objective(model, x, y).sum().backward()
    model.zero_grad(set_to_none=True)
    return capture.layers()


def per_example_gradients(layers: list[LayerBatch]) -> torch.Tensor:
    """Flattened per-example gradients (B, P) in the core's parameter layout: small models only."""
    return torch.cat([layer.per_example_gradients().flatten(1) for layer in layers], dim=1)
