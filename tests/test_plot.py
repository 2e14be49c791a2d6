"""gradscope.plot: one generic check run over every figure function (draws, labelled axes,
`ax=`, clear errors on empty and NaN input), then what each figure must show."""

import doctest

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradscope as gs  # noqa: E402
import gradscope.plot as gp  # noqa: E402
from gradscope import frame as fr  # noqa: E402
from gradscope.lab.models import build_model  # noqa: E402
from gradscope.plot import common, outputs, run, sweep  # noqa: E402


def _train(model, x, y, steps=4, every=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gs.watch(model, every=every) as rec:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            loss.backward()
            opt.step()
    return rec


@pytest.fixture(scope="module")
def convnet():
    """A CNN with the parameter-free modules that pass zeros on (pool, Identity, dropout)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.Tanh(),
    )
    return _train(model, torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))


@pytest.fixture(scope="module")
def preln():
    torch.manual_seed(0)
    rec = _train(
        build_model("preln", 6, width=16), torch.randn(16, 784), torch.randint(0, 10, (16,))
    )
    return rec


@pytest.fixture(scope="module")
def runs_table():
    rows = []
    for variant, accs in (("plain", [0.9, 0.1]), ("preln", [0.9, 0.88])):
        for depth, acc in zip((4, 32), accs, strict=True):
            rows.append(
                {"variant": variant, "depth": depth, "seed": 0, "test_acc": acc,
                 "diverged": False, "verdicts": "vanishing_gradients" if acc < 0.5 else "",
                 "grad_ratio_init": 10.0 ** (-0.4 * depth if variant == "plain" else -0.1),
                 "grad_ratio_end": 10.0 ** (-0.3 * depth if variant == "plain" else -0.1),
                 "grad_decay_init": 0.4 if variant == "plain" else 0.01,
                 "grad_decay_theory": 0.39 if variant == "plain" else np.nan}
            )  # fmt: skip
    return pd.DataFrame(rows)


# every figure function, with the input it draws from (a fixture's name) and its arguments
FIGURES = [
    (gp.gradient_profile, "preln", {}),
    (gp.heatmap, "preln", {}),
    (gp.over_steps, "preln", {}),
    (gp.activations, "convnet", {"stat": "rms"}),
    (gp.activations, "convnet", {"stat": "zero_frac"}),
    (gp.activations, "convnet", {"stat": "dead_units"}),
    (gp.activations, "convnet", {"stat": "saturated_frac"}),
    (gp.update_ratio, "preln", {}),
    (gp.residual_stream, "preln", {}),
    (gp.scalars, "preln", {}),
    (gp.trainability_map, "runs_table", {}),
    (gp.ratio_vs_depth, "runs_table", {}),
    (gp.slope_vs_depth, "runs_table", {}),
]


@pytest.mark.parametrize(
    ("draw", "source", "kwargs"), FIGURES, ids=lambda v: getattr(v, "__name__", "")
)
def test_every_figure_draws_labelled_into_the_given_axes(draw, source, kwargs, request):
    data = request.getfixturevalue(source)
    fig, (left, right) = plt.subplots(1, 2)
    try:
        got = draw(data, **kwargs, ax=right)
        assert got is right and not left.has_data()  # drew where it was told, nowhere else
        assert right.has_data() or right.images
        assert right.get_xlabel() and right.get_ylabel() and right.get_title()
        alone = draw(data, **kwargs)  # without ax: a figure of its own
        assert alone.figure is not fig and alone.get_xlabel() == right.get_xlabel()
        plt.close(alone.figure)
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    ("draw", "source", "kwargs"), FIGURES, ids=lambda v: getattr(v, "__name__", "")
)
def test_every_figure_says_why_on_empty_or_nan_input(draw, source, kwargs, request):
    data = request.getfixturevalue(source)
    frame = data if isinstance(data, pd.DataFrame) else data.to_frame()
    with pytest.raises(gp.PlotError, match=r"empty|no |lacks"):
        draw(frame.iloc[:0], **kwargs)
    if "value" in frame:
        nan = frame.assign(value=np.where(frame["stat"] == "ndim", frame["value"], np.nan))
    else:
        nan = frame.assign(**{c: np.nan for c in frame.columns if c.startswith(("test", "grad"))})
    with pytest.raises(gp.PlotError, match=r"NaN|no "):
        draw(nan, **kwargs)
    with pytest.raises(gp.PlotError, match="expected"):
        draw([1, 2, 3], **kwargs)
    plt.close("all")


def test_examples_in_the_docstrings_run():
    for module in (gp, run, outputs, sweep, common):
        failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)[:2]
        assert failed == 0, module.__name__
    # every figure of a run has its example
    assert doctest.testmod(run)[1] + doctest.testmod(outputs)[1] >= 8
    plt.close("all")


def test_a_deep_plain_sequential_keeps_one_row_per_convolution():
    """60 convolutions in one nn.Sequential (no blocks): 61 rows, input side first."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    for _ in range(59):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    rec = _train(model, torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,)), steps=2)
    matrices = fr.weight_matrices(rec.to_frame())
    assert len(matrices) == 61
    ax = gp.heatmap(rec)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == matrices  # one row each, in depth order
    plt.close("all")


def test_many_layers_are_grouped_into_ranges_that_keep_the_input_side_apart():
    names = [f"features.{i}.weight" for i in range(200)]
    frame = pd.DataFrame({"step": 0, "layer": names, "kind": "param", "stat": "ndim", "value": 2.0})
    groups = gp.row_groups(frame, names)
    rows = list(dict.fromkeys(groups.values()))
    assert len(rows) <= gp.MAX_ROWS
    assert rows[0] == "features.0.weight .. features.3.weight"  # input side: its own range
    assert groups["features.199.weight"] == rows[-1]
    # each row is a run of consecutive layers
    order = [rows.index(groups[n]) for n in names]
    assert order == sorted(order)


def _frame_with_zero_grad(first_zero: bool):
    torch.manual_seed(0)
    model = build_model("plain", 4, width=16)
    if first_zero:
        for p in model.parameters():  # the input layer gets a zero gradient
            p.register_hook(
                lambda g, p=p: torch.zeros_like(g) if p is next(model.parameters()) else g
            )
    return _train(model, torch.randn(16, 784), torch.randint(0, 10, (16,)), steps=2).to_frame()


def test_zeros_are_drawn_at_the_floor_and_labelled():
    frame = _frame_with_zero_grad(True)
    first = fr.weight_matrices(frame)[0]
    assert (fr.select(frame, "param_grad", "norm", layers=[first])["value"] == 0).all()
    ax = gp.gradient_profile(frame, steps=[0, 1])
    marks = [c for c in ax.collections if len(c.get_offsets())]
    offsets = np.concatenate([c.get_offsets() for c in marks])
    assert sorted(offsets[:, 0]) == [0.0, 0.0]  # layer 0, at both steps
    assert np.all(offsets[:, 1] <= ax.get_ylim()[0] * 2.01)  # at the axis's floor
    assert any("exactly 0 (2" in t.get_text() for t in ax.get_legend().get_texts())
    heat = gp.heatmap(frame)
    assert "2 cell(s) exactly 0" in heat.get_title()
    plt.close("all")


def test_the_heatmap_colour_scale_is_the_same_for_every_run(preln):
    torch.manual_seed(1)
    other = _train(build_model("plain", 12, width=16), torch.randn(16, 784),
                   torch.randint(0, 10, (16,)))  # fmt: skip
    low, high = gp.LOG10_SCALES["param_grad/norm"]
    colours = []
    for rec in (preln, other):
        ax = gp.heatmap(rec)
        mesh = ax.collections[0]
        assert (mesh.norm.vmin, mesh.norm.vmax) == (low, high)
        colours.append(mesh.cmap(mesh.norm(-3.0)))  # what 1e-3 looks like in this run
    assert colours[0] == colours[1]
    plt.close("all")


def test_zero_fractions_only_for_activation_functions(convnet):
    types = convnet.model_summary["types"]
    frame = convnet.to_frame()
    ax = gp.activations(frame, "zero_frac", types=types)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["1", "5"]  # the ReLUs, not pool 2, Identity 3, dropout 6
    # from the frame alone (no module types): pool and Identity pass zeros on and are left
    # out; dropout adds zeros of its own, which the frame cannot tell from a ReLU's
    ax = gp.activations(frame, "zero_frac")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "6"]
    # a Recorder or a Run carries the types: the figure finds them itself
    ax = gp.activations(convnet, "zero_frac")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5"]
    plt.close("all")
    ax = gp.activations(frame, "saturated_frac", types=types)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["9"]  # the Tanh
    ax = gp.activations(frame, "rms", types=types)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(types)  # every module
    plt.close("all")


def _dead_reference(model, x, channel_dims):
    """One recorded step; per ReLU, the share of units (features, or channels over batch
    and space) that are 0 for every sample, computed directly in torch."""
    seen = {}
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    handles = [
        m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.detach()))
        for n, m in relus
    ]
    with gs.watch(model) as rec:
        model(x).sum().backward()
        rec.step()
    for h in handles:
        h.remove()
    dead = {}
    for name, out in seen.items():
        reduce = [d for d in range(out.ndim) if d != 1] if out.ndim in channel_dims else [0]
        dead[name] = float((out == 0).all(dim=reduce[0] if len(reduce) == 1 else tuple(reduce))
                           .float().mean())  # fmt: skip
    return rec, dead


@pytest.mark.parametrize("shape", ["mlp", "cnn"])
def test_dead_units_are_units_zero_for_the_whole_batch(shape):
    """The dead panel plots dead_units / units of each ReLU (a ReLU MLP with units killed by
    a bias of -100; a CNN with max-pool with channels killed), equal to the fraction computed
    in torch, and not the exact-zero element fraction a healthy ReLU has near 0.5."""
    torch.manual_seed(0)
    if shape == "mlp":
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                              nn.Linear(16, 3))  # fmt: skip
        killed = model[2]
        x = torch.randn(32, 12)
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 3))  # fmt: skip
        killed = model[3]
        x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        killed.bias[:6] = -100.0  # 6 units (or channels) of the second ReLU: 6/16 or 6/8
    rec, dead = _dead_reference(model, x, channel_dims={4})
    ax = gp.activations(rec, "dead_units", steps=0)
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == list(dead)  # the ReLUs only (not the max-pool, which passes them on)
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([dead[n] for n in names])
    assert dead[names[1]] >= 6 / killed.bias.numel()  # the killed ones (and any others)
    assert ax.get_ylabel() == "fraction of units dead"
    zeros = gp.activations(rec, "zero_frac", steps=0)
    assert zeros.get_ylabel() == "fraction of elements exactly 0"
    assert zeros.get_lines()[0].get_ydata()[0] > dead[names[0]] + 0.2  # a healthy ReLU's zeros
    plt.close("all")


def test_recordings_without_dead_units_show_zero_elements_against_their_limit(convnet):
    """A recording from before the per-unit statistic: the dead-units rule judges exact-zero
    elements (at 97%), so their figure carries that line, and the report shows it once."""
    from gradscope.analysis.rules.units import DEAD_ELEMENT_FRAC
    from gradscope.report.run import _dead_stat

    frame = convnet.to_frame()
    old = frame[~frame["stat"].isin(["dead_units", "units"])]
    limits = [line.get_ydata()[0] for line in gp.activations(old, "zero_frac").get_lines()[2:]]
    assert limits == [DEAD_ELEMENT_FRAC]
    assert len(gp.activations(frame, "zero_frac").get_lines()) == 2  # steps only, no limit
    assert (_dead_stat(old), _dead_stat(frame)) == ("zero_frac", "dead_units")
    with pytest.raises(gp.PlotError, match="dead units"):
        gp.activations(old, "dead_units")
    plt.close("all")


def test_the_residual_stream_has_its_own_block_axis(preln):
    ax = gp.residual_stream(preln)
    blocks = fr.stream_layers(preln.to_frame())
    assert [t.get_text() for t in ax.get_xticklabels()] == blocks
    assert all(len(line.get_xdata()) == len(blocks) for line in ax.get_lines())
    plt.close("all")


def test_the_verdict_timeline_spans_each_verdicts_steps():
    verdicts = [
        gs.Verdict("vanishing_gradients", "error", "m", "s", first_step=0, last_step=9),
        gs.Verdict("gradient_spike", "warning", "m", "s", first_step=4, last_step=4),
    ]
    ax = gp.verdict_timeline(verdicts)
    bars = [(p.get_x(), p.get_width()) for p in ax.patches]
    assert bars == [(-0.5, 10.0), (3.5, 1.0)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vanishing_gradients", "gradient_spike"]
    with pytest.raises(gp.PlotError, match="no verdicts"):
        gp.verdict_timeline([])
    plt.close("all")


def test_the_trainability_map_colours_accuracy_on_a_fixed_scale(runs_table):
    ax = gp.trainability_map(runs_table, depths=[4, 16, 32])
    image = ax.images[0]
    assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
    values = image.get_array()
    assert values.shape == (2, 3) and np.isnan(
        np.ma.filled(values, np.nan)[0, 1]
    )  # depth 16 not run yet
    texts = [t.get_text() for t in ax.texts]
    assert "10%\nchance" in texts and "90%\nhealthy" in texts
    plt.close("all")


def test_slope_against_depth_draws_the_theory_line(runs_table):
    ax = gp.slope_vs_depth(runs_table)
    assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == 0.39 for line in ax.lines)
    plt.close("all")


def test_a_theory_line_on_the_profile(preln):
    ax = gp.gradient_profile(preln, "last", theory_slope=0.39)
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1
    y = dotted[0].get_ydata()
    assert np.log10(y[-1] / y[0]) == pytest.approx(0.39 * (len(y) - 1))
    with pytest.raises(gp.PlotError, match="not recorded"):
        gp.gradient_profile(preln, steps=[999])
    plt.close("all")
