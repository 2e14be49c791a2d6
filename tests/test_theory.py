"""gradscope.lab.theory against known values and against measured plain stacks at init."""

import math

import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.frame import decay_slope, gradient_profile
from gradscope.lab import theory
from gradscope.lab.models import build_model


def test_known_values():
    # PyTorch's default init: Var(W) = 1/(3 fan_in); ReLU halves it: chi_1 = 1/6
    assert theory.decay_per_layer("relu", "default") == pytest.approx(math.log10(math.sqrt(6)))
    assert theory.decay_per_layer("tanh", "default") == pytest.approx(0.24, abs=0.005)
    assert theory.decay_per_layer("relu", "kaiming") == pytest.approx(0.0, abs=1e-9)
    # weight gradients decay as the back-propagated signal once activations are stationary
    for act in ("relu", "tanh"):
        assert theory.decay_per_layer(act, "default", quantity="param_grad") == pytest.approx(
            theory.decay_per_layer(act, "default")
        )
    # Xiong et al. 2020: a Pre-LN ReLU branch under Xavier (gain 1) adds 0.5 per block; the
    # zoo's xavier uses ReLU's gain (2x the variance twice): 2
    assert theory.preln_stream_growth("relu", "xavier") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown init"):
        theory.decay_per_layer("relu", "lecun")
    with pytest.raises(ValueError, match="unknown quantity"):
        theory.decay_per_layer("relu", "default", quantity="loss")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("init", ["default", "kaiming", "xavier"])
def test_theory_matches_measured_plain_stacks_at_init(activation, init):
    torch.manual_seed(0)
    model = build_model("plain", 40, width=128, activation=activation, init=init)
    with gs.watch(model, activations=False, activation_grads=False) as rec:
        logits = model(torch.randn(256, 784))
        nn.functional.cross_entropy(logits, torch.randint(0, 10, (256,))).backward()
        rec.step()
    norms = gradient_profile(rec.to_frame(), 0)["norm"].to_numpy()
    measured = decay_slope(norms[1:-1])  # the 784-wide input and 10-wide output layers apart
    predicted = theory.decay_per_layer(activation, init, width=128, quantity="param_grad")
    assert measured == pytest.approx(predicted, abs=0.03)


def test_residual_stream_growth():
    # kaiming on both maps of a ReLU branch (sigma_w^2 = 2 each) adds twice the stream's
    # mean square per block: the stream triples (a variance-preserving branch would double it)
    ms = theory.residual_stream("relu", "kaiming", 128, 1.0, 5)
    assert ms.tolist() == pytest.approx([1.0, 3.0, 9.0, 27.0, 81.0])
    # PyTorch's default init: about 1/18 more per block (biases add a little)
    default = theory.residual_stream("relu", "default", 128, 1.0, 3)
    assert default[1] / default[0] == pytest.approx(1 + 1 / 18, abs=0.01)


def test_residual_stream_theory_matches_a_measured_stack():
    torch.manual_seed(0)
    model = build_model("residual", 12, width=128)
    outs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, o: outs.append(float(o.double().square().mean())))
    with torch.no_grad():
        model(torch.randn(512, 784))
    predicted = theory.residual_stream("relu", "default", 128, outs[0], len(outs))
    assert outs == pytest.approx(predicted.tolist(), rel=0.05)
