"""Mean-field predictions to hold measurements against: how fast gradients decay with depth in
a plain stack, and how the residual stream grows at init.

A plain stack h_l = W_l phi(h_{l-1}) + b_l, with Var(W_ij) = sigma_w^2 / fan_in and
Var(b_i) = sigma_b^2, propagates a per-unit pre-activation variance q by the map
(Glorot & Bengio 2010; Poole et al. 2016; Schoenholz et al. 2017)

    q_l = sigma_w^2 E_z[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2,        z ~ N(0, 1),

to a fixed point q*. Back-propagated gradients are multiplied per layer, in mean square, by

    chi_1 = sigma_w^2 E_z[phi'(sqrt(q*) z)^2]

so their norm loses -log10(sqrt(chi_1)) decades per layer toward the input (He et al. 2015:
ReLU with sigma_w^2 = 2 keeps chi_1 = 1). A weight gradient dL/dW_l = delta_l phi(h_{l-1})^T
also carries the forward activation's norm, which changes per layer until q reaches q*
(where q* = 0 it shrinks geometrically): that change is added for ``quantity="param_grad"``.
Expectations are Gauss-Hermite sums (64 nodes).

The inits as the model zoo (gradscope.lab.models) defines them, for square layers of width N:
``default`` is PyTorch's nn.Linear init, U(+-1/sqrt(N)) weights (sigma_w^2 = 1/3) and biases
(sigma_b^2 = 1/(3N)); ``kaiming``, ``xavier`` and ``orthogonal`` use the activation's gain g
(nn.init.calculate_gain; GELU takes ReLU's) with sigma_w^2 = g^2 and zero biases.

Known values: ReLU under the default init loses log10(sqrt(6)) = 0.389 decades per layer;
tanh under the default init about 0.24 (q* is tiny, so tanh is nearly linear and
chi_1 ~ 1/3); ReLU under kaiming 0.

Residual streams at init: a Pre-LN stack adds to the stream, per block, the variance of its
branch applied to a unit-variance LayerNorm output, so the stream's mean square grows
linearly with depth (Xiong et al. 2020): `preln_stream_growth`. An unnormalized residual
stack with a variance-preserving branch (sigma_w^2 chi = 1) doubles it per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
from torch import nn

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
INITS = ("default", "kaiming", "xavier", "orthogonal")
QUANTITIES = ("activation_grad", "param_grad")
_NODES = 64
_FORWARD_LAYERS = 400  # iterations of the variance map to reach (or approach) q*


def _phi(
    activation: str,
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """The activation and its derivative, on numpy arrays."""
    if activation == "relu":
        return (lambda x: np.maximum(x, 0.0)), (lambda x: (x > 0).astype(float))
    if activation == "tanh":
        return np.tanh, (lambda x: 1.0 - np.tanh(x) ** 2)
    if activation == "sigmoid":
        sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        return sig, (lambda x: sig(x) * (1.0 - sig(x)))
    if activation == "gelu":
        erf = np.vectorize(math.erf)
        cdf = lambda x: 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # noqa: E731
        pdf = lambda x: np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # noqa: E731
        return (lambda x: x * cdf(x)), (lambda x: cdf(x) + x * pdf(x))
    raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")


def weight_and_bias_variance(activation: str, init: str, width: int) -> tuple[float, float]:
    """(sigma_w^2, sigma_b^2) of the zoo's init for square layers of `width` units."""
    if init == "default":
        return 1.0 / 3.0, 1.0 / (3.0 * width)
    if init in ("kaiming", "xavier", "orthogonal"):
        gain_name = "relu" if activation == "gelu" else activation
        return nn.init.calculate_gain(gain_name) ** 2, 0.0  # type: ignore[arg-type]
    raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


@cache
def _gauss() -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(_NODES)
    return nodes, weights / math.sqrt(2.0 * math.pi)


def _expect(f: Callable[[np.ndarray], np.ndarray], q: float) -> float:
    nodes, weights = _gauss()
    return float(np.sum(weights * f(math.sqrt(max(q, 0.0)) * nodes)))


def fixed_point(activation: str, init: str, width: int = 128) -> tuple[float, float]:
    """(q*, forward decades per layer): the variance map iterated from q = 1, and how fast
    the activations' norm still changes per layer there (0 at a fixed point q* > 0)."""
    phi, _ = _phi(activation)
    sw, sb = weight_and_bias_variance(activation, init, width)
    q = 1.0
    for _ in range(_FORWARD_LAYERS):
        q_next = sw * _expect(lambda x: phi(x) ** 2, q) + sb
        if q_next <= 1e-300:
            return 0.0, math.inf
        ratio = q_next / q
        q = q_next
    return q, -0.5 * math.log10(ratio)


def decay_per_layer(
    activation: str, init: str, width: int = 128, quantity: str = "activation_grad"
) -> float:
    """Predicted decades of gradient norm lost per layer toward the input in a deep plain
    stack (positive: vanishing; negative: exploding).

    Args:
        activation: relu, tanh, sigmoid or gelu.
        init: default, kaiming, xavier or orthogonal, as the zoo defines them.
        width: the layers' width (enters through the default init's bias variance).
        quantity: "activation_grad" (the back-propagated signal, dL/dh) or "param_grad"
            (weight gradients, which also carry the forward activation's change per layer).

    Example:
        >>> round(decay_per_layer("relu", "default"), 3)
        0.389
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
    _, dphi = _phi(activation)
    sw, _ = weight_and_bias_variance(activation, init, width)
    q, forward = fixed_point(activation, init, width)
    chi = sw * _expect(lambda x: dphi(x) ** 2, q)
    back = -0.5 * math.log10(chi)
    if quantity == "activation_grad" or not math.isfinite(forward):
        return back
    # going toward the input, activations are larger by the forward decay per layer
    return back - forward


def preln_stream_growth(activation: str = "relu", init: str = "xavier", width: int = 128) -> float:
    """Mean square added to a Pre-LN stream per block at init: Var of fc2(phi(fc1(z))) for a
    unit-variance LayerNorm output z (Xiong et al. 2020: 0.5 under Xavier with gain 1 and
    ReLU). Uses the zoo's init of both linear maps."""
    phi, _ = _phi(activation)
    sw, sb = weight_and_bias_variance(activation, init, width)
    hidden = sw * 1.0 + sb  # fc1 on unit-variance inputs
    return sw * _expect(lambda x: phi(x) ** 2, hidden) + sb


def residual_stream(
    activation: str, init: str, width: int, start: float, blocks: int
) -> np.ndarray:
    """Mean square of an unnormalized residual stream, block by block from `start`: each
    block adds its branch fc2(phi(fc1(x))), whose variance for a stream of mean square q is
    sigma_w^2 E[phi(sqrt(sigma_w^2 q + sigma_b^2) z)^2] + sigma_b^2. With a variance-preserving
    branch (ReLU, kaiming fc1 and a fc2 of gain 1) the stream doubles per block; under
    PyTorch's default init it grows by about 1/18 per block."""
    phi, _ = _phi(activation)
    sw, sb = weight_and_bias_variance(activation, init, width)
    out = np.empty(blocks)
    q = start
    for i in range(blocks):
        out[i] = q
        q = q + sw * _expect(lambda x: phi(x) ** 2, sw * q + sb) + sb
        if not math.isfinite(q):
            out[i + 1 :] = math.inf
            break
    return out
