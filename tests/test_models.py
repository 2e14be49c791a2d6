import pytest
import torch
from torch import nn

from gradscope.lab.models import Variant, build_classic, build_model, build_named


@pytest.mark.parametrize("variant", [v.value for v in Variant])
@pytest.mark.parametrize("depth", [1, 2, 100])
def test_every_variant_builds_and_backprops(variant, depth):
    torch.manual_seed(0)
    model = build_model(variant, depth, width=32)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_module_names_are_stable():
    names = dict(build_model("preln", 3).named_modules())
    for name in (
        "embed",
        "blocks.2.norm",
        "blocks.2.fc1",
        "blocks.2.act",
        "blocks.2.fc2",
        "norm",
        "head",
    ):
        assert name in names
    plain = dict(build_model("plain", 3).named_modules())
    assert "blocks.0.fc" in plain and "blocks.2.act" in plain
    assert plain["blocks.0.fc"].in_features == 784
    assert isinstance(dict(build_model("rmsnorm", 2).named_modules())["blocks.1.norm"], nn.RMSNorm)
    assert isinstance(dict(build_model("batchnorm", 2).named_modules())["norm"], nn.BatchNorm1d)
    post = build_model("postln", 2)
    assert post.norm is None and post.blocks[0].post_norm


def test_postln_normalizes_after_the_addition():
    torch.manual_seed(0)
    block = build_model("postln", 1, width=16).blocks[0]
    x = torch.randn(5, 16) * 7 + 3
    out = block(x)
    ref = nn.functional.layer_norm(x + block.fc2(block.act(block.fc1(x))), (16,))
    torch.testing.assert_close(out, ref)


def test_depth_1000_builds():
    model = build_model("preln", 1000, width=8)
    assert len(model.blocks) == 1000


@pytest.mark.parametrize("init", ["kaiming", "xavier", "orthogonal"])
def test_inits_zero_biases_and_set_scale(init):
    torch.manual_seed(0)
    model = build_model("plain", 3, width=256, init=init)
    fc = model.blocks[1].fc
    assert torch.count_nonzero(fc.bias) == 0
    std = float(fc.weight.detach().std())
    expected = {
        "kaiming": (2 / 256) ** 0.5,
        "xavier": 2**0.5 * (2 / 512) ** 0.5,
        "orthogonal": 2**0.5 / 256**0.5,
    }
    assert std == pytest.approx(expected[init], rel=0.05)


def test_default_init_keeps_bias():
    torch.manual_seed(0)
    assert torch.count_nonzero(build_model("plain", 2).blocks[0].fc.bias) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "dense"}, "unknown variant"),
        ({"activation": "swish"}, "unknown activation"),
        ({"init": "lecun"}, "unknown init"),
        ({"depth": 0}, "depth"),
        ({"width": 0}, "width"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_raise_clearly(kwargs, match):
    args = {"variant": "plain", "depth": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_classic_classifiers():
    digit = build_classic("digit")
    shapes = [tuple(p.shape) for p in digit.parameters()]
    assert shapes == [(128, 784), (128,), (10, 128), (10,)]
    assert build_classic("digit-dropout").blocks[0].drop.p == 0.2
    deep = build_classic("deep-digit")
    assert len(deep.blocks) == 2
    block = deep.blocks[0]
    assert (
        isinstance(block.norm, nn.LayerNorm) and block.fc.in_features == 128 and block.drop.p == 0.1
    )
    assert build_named("deep-digit")(torch.zeros(2, 784)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_named("resnet")


def test_the_example_recording_is_a_detached_recorder_of_the_asked_steps():
    import doctest

    import gradscope.lab.models as models

    assert doctest.testmod(models)[0] == 0
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rec = models.recorded_example("plain", depth=3, steps=2)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state untouched
    frame = rec.to_frame()
    assert sorted(frame["step"].unique()) == [0, 1] and not rec.attached
