"""Which axis of a module's output holds its units (features or channels), for the dead-unit
count: the number of units that are exactly zero for every sample and position of a batch.

The rule, decided per module at attach and per output by its number of dimensions:

- outputs of 4 or more dimensions, and outputs of 3 dimensions of a *channel-first* module,
  have their units on dim 1 (N, C, ...): the channels of convolutions, pools and
  batch/instance/group norms;
- other outputs of 2 or more dimensions have them on the last dim (N, F) or (N, T, F): the
  features of linear layers, attention, layer norms and recurrent layers (batch_first);
- outputs of 0 or 1 dimension are one unit.

Channel-first modules: the convolution, pool, batch/instance/group norm, channel dropout and
upsampling families. A module with no layout of its own (activations, dropout, identity)
takes the layout of the watched leaf before it in the model's module order, so a ReLU after a
Conv1d counts channels while a ReLU after a Linear counts features; a composite module (a
block) takes the layout of its last leaf.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import activation, batchnorm, conv, dropout, instancenorm, pooling

_CHANNEL_FIRST = (
    conv._ConvNd,
    pooling._MaxPoolNd,
    pooling._AvgPoolNd,
    pooling._AdaptiveMaxPoolNd,
    pooling._AdaptiveAvgPoolNd,
    pooling._LPPoolNd,
    pooling._MaxUnpoolNd,
    batchnorm._NormBase,  # batch and instance norms
    instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)


def _follows(module: nn.Module) -> bool:
    """Whether a leaf keeps its input's layout (elementwise: activations, dropout, identity)."""
    if isinstance(module, nn.MultiheadAttention | nn.Softmax | nn.LogSoftmax | nn.Softmin):
        return False
    return type(module).__module__ == activation.__name__ or isinstance(
        module, dropout._DropoutNd | nn.Identity
    )


def _leaf_layouts(leaves: list[nn.Module], start: bool = False) -> list[bool]:
    """Channel-first flag of each leaf, in order (elementwise leaves take the one before)."""
    flags, last = [], start
    for leaf in leaves:
        if not _follows(leaf):
            last = isinstance(leaf, _CHANNEL_FIRST)
        flags.append(last)
    return flags


def channel_first(modules: list[tuple[str, nn.Module]]) -> frozenset[str]:
    """The labels of the watched modules (label, module), in module order, whose outputs put
    their units on dim 1 where they have 3 dimensions (see the module docstring)."""
    found = set()
    leaves = [(label, m) for label, m in modules if next(m.children(), None) is None]
    for (label, _), flag in zip(leaves, _leaf_layouts([m for _, m in leaves]), strict=True):
        if flag:
            found.add(label)
    for label, module in modules:
        inner = [m for m in module.modules() if next(m.children(), None) is None]
        if inner and inner[0] is not module and _leaf_layouts(inner)[-1]:
            found.add(label)
    return frozenset(found)


def unit_axis(ndim: int, channel_first: bool) -> int | None:
    """The units' dim of an output with `ndim` dimensions; None: the output is one unit."""
    if ndim <= 1:
        return None
    if ndim >= 4 or (ndim == 3 and channel_first):
        return 1
    return ndim - 1


def unit_shape(shape: tuple[int, ...] | list[int], axis: int | None) -> tuple[int, int, int]:
    """(outer, units, inner): the output as outer x units x inner, units along `axis`."""
    numel = 1
    for size in shape:
        numel *= size
    if axis is None:
        return 1, 1, numel
    outer = 1
    for size in shape[:axis]:
        outer *= size
    units = shape[axis]
    inner = numel // (outer * units) if outer * units else 0
    return outer, units, inner
