"""The re-initializing remedies: each Linear/Conv layer given an init matched to the activation
after it (kaiming, xavier with the tanh/sigmoid gain) or an orthogonal one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from gradscope.remedies.core import CannotApply, Context

# the modules whose weights an init shapes, and the activations that set its gain
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.Mish, nn.SELU)
_GAINS: dict[type[nn.Module], str] = {nn.Tanh: "tanh"}


@dataclass
class _Layer:
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    act: nn.Module | None = None


def _layers_and_activations(model: nn.Module) -> list[_Layer]:
    """Each Linear/Conv layer with the activation module registered after it (before the next
    layer): registration order is forward order in sequential stacks."""
    found: list[_Layer] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, _LAYERS) and isinstance(weight, torch.Tensor):
            bias = getattr(module, "bias", None)
            found.append(_Layer(name, weight, bias if isinstance(bias, torch.Tensor) else None))
        elif found and found[-1].act is None and _is_activation(module):
            found[-1].act = module
    return found


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _RELU_LIKE + (nn.LeakyReLU, nn.Tanh, nn.Sigmoid))


def reinit(orthogonal: bool) -> Callable[[nn.Module, Optimizer, Context], Optimizer]:
    def change(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
        layers = _layers_and_activations(model)
        if not layers:
            raise CannotApply("the model has no Linear or Conv layer to re-initialize")
        if any(not layer.weight.is_floating_point() for layer in layers):
            raise CannotApply("a layer's weight is not floating point (quantized?)")
        g = torch.Generator(device=layers[0].weight.device).manual_seed(context.seed)
        with torch.no_grad():
            for layer in layers:
                weight, gain = layer.weight, _gain(layer.act)
                fresh = torch.empty_like(weight)
                fan_in = weight[0].numel()
                if orthogonal:
                    nn.init.orthogonal_(fresh, gain=gain, generator=g)
                elif isinstance(layer.act, _RELU_LIKE + (nn.LeakyReLU,)):
                    fresh.normal_(0.0, gain / math.sqrt(fan_in), generator=g)
                else:  # xavier: keeps both passes' variance for bounded or no activation
                    fan_out = weight.shape[0] * weight[0, 0].numel()
                    fresh.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=g)
                weight.copy_(fresh)
                if layer.bias is not None:
                    layer.bias.zero_()
                # momentum or moment estimates of the old weights no longer fit
                for p in (weight, layer.bias):
                    if p is not None:
                        optimizer.state.pop(p, None)
        return optimizer

    return change


def _gain(act: nn.Module | None) -> float:
    # a sigmoid's slope at 0 is 1/4, so 4x the xavier scale keeps a signal's size through it
    # (the Theano deep learning tutorials, after Glorot and Bengio 2010); torch's
    # calculate_gain("sigmoid") is 1, which leaves a deep sigmoid stack vanishing after it
    if isinstance(act, nn.Sigmoid):
        return 4.0
    if isinstance(act, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", act.negative_slope)
    if isinstance(act, _RELU_LIKE):
        return nn.init.calculate_gain("relu")
    for kind, name in _GAINS.items():
        if isinstance(act, kind):
            return nn.init.calculate_gain(name)  # type: ignore[arg-type]
    return 1.0
