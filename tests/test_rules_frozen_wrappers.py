"""The session-2 rules: a layer frozen between layers that train, inf/NaN made in an unrecorded
wrapper's forward, the onset of unzeroed gradients, pass-through modules not "dead", and a
transient gradient spike on an ordinary batch."""

import numpy as np
import pandas as pd
import torch
from torch import nn

import gradscope as gs
from gradscope.analysis import diagnose
from gradscope.analysis.rules import accumulation, frozen, units
from gradscope.analysis.view import RunView
from gradscope.recorder.plan import frozen_of


def _train(model, steps=12, zero_grad=True, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with gs.watch(model, optimizer=opt, every=1) as rec:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=g)
            if zero_grad:
                opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
            loss.backward()
            rec.log_scalar("loss", loss)
            opt.step()
    return rec


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def test_frozen_of_lists_the_frozen_parameters_in_parameter_order():
    model = _mlp()
    model[2].weight.requires_grad_(False)
    direct = [i for i, (_, p) in enumerate(model.named_parameters()) if not p.requires_grad]
    assert frozen_of(model) == {"names": ["2.weight"], "positions": direct, "of": 6}


def test_a_layer_frozen_in_the_middle_is_a_warning_naming_it():
    model = _mlp()
    model[2].requires_grad_(False)
    rec = _train(model)
    assert rec.model_summary["frozen"]["names"] == ["2.weight", "2.bias"]
    found = [v for v in rec.diagnose() if v.id == "no_gradient"]
    assert found and found[0].severity == "warning" and found[0].layers == ["2"]
    assert "2.weight" in found[0].message and "requires_grad=False" in found[0].message
    # the frame alone cannot show it (the summary carries it)
    assert not any(v.severity == "warning" for v in diagnose(rec.to_frame()))


def test_a_frozen_prefix_or_a_pattern_of_frozen_weights_is_no_warning():
    model = _mlp()
    model[0].requires_grad_(False)  # a frozen "backbone"
    rec = _train(model)
    assert not [v for v in rec.diagnose() if v.severity in ("warning", "error")]
    view = RunView(
        pd.DataFrame({"step": [0, 1], "layer": "x", "kind": "param", "stat": "norm", "value": 1.0}),
        {"frozen": {"names": ["a", "b", "c"], "positions": [1, 3, 5], "of": 7}},
    )
    assert frozen.stretches([1, 3, 5]) == [[0], [1], [2]]
    (v,) = frozen.check(view)  # three stretches: a chosen pattern (BitFit-like), info
    assert v.severity == "info"


class _Wrapper(nn.Module):
    """Wraps a layer and makes NaN in its own forward on one call."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        y = self.inner(x)
        self.calls += 1
        return torch.log(y - y.detach().max() - 1.0) if self.calls == self.at + 1 else y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = _Wrapper(nn.Linear(16, 32), 3)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_nan_made_in_an_unrecorded_wrapper_names_the_wrapper_first():
    torch.manual_seed(0)
    rec = _train(_Net(), steps=5)
    frame = rec.to_frame()
    # the wrapper's output is not recorded; its inner layer's is (finite), the norm's is not
    assert "fc1" not in set(frame["layer"]) and "fc1.inner" in set(frame["layer"])
    v = next(v for v in rec.diagnose() if v.id == "nonfinite_forward")
    assert v.layers == ["fc1", "norm"] and v.first_step == 3


def test_unzeroed_gradients_are_dated_where_they_start_growing():
    rec = _train(_mlp(), steps=30, zero_grad=False, lr=0.01)
    view = RunView(rec.to_frame())
    (v,) = accumulation.check(view)
    k = accumulation.kappa(view)["0"].dropna()
    # a direct reading of the definition: from the onset on, kappa stays above 1.5x its first
    onset = v.first_step
    assert (k[(k.index >= onset) & (k.index <= 20)] > 1.5 * k.iloc[0]).all()
    assert onset <= 3


def test_dropout_after_a_relu_passes_zeros_on_and_is_not_judged():
    rows = []
    for step in range(4):
        for layer, zf in (("fc", 0.0), ("relu", 0.6), ("drop", 0.6)):
            rows.append((step, layer, "activation", "zero_frac", zf))
    view = RunView(pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"]))
    assert units.pass_through(view) == {"drop"}


def test_the_views_tables_are_pandas_pivot_tables():
    from gradscope.analysis.view import _wide

    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "step": rng.integers(0, 30, n),
            "layer": rng.choice(["b", "a", "c.x", "d"], n),
            "kind": rng.choice(["activation", "param_grad"], n),
            "stat": rng.choice(["rms", "norm"], n),
            "value": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        }
    )
    frame.loc[frame["step"] == 7, "value"] = np.nan  # a step with no value at all
    for kind, stat in (("activation", "rms"), ("param_grad", "norm"), ("param", "norm")):
        ours = _wide(frame, kind, stat)
        rows = frame[(frame["kind"] == kind) & (frame["stat"] == stat)]
        if rows.empty:
            assert ours.empty
            continue
        ref = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="first")
        ref = ref.reindex(columns=list(dict.fromkeys(rows["layer"]))).sort_index()
        pd.testing.assert_frame_equal(ours, ref, check_names=False, check_index_type=False)


def test_dead_units_explain_vanishing_only_when_they_come_after_the_starved_layers():
    from gradscope.analysis.rank import rank
    from gradscope.verdict import Verdict

    def dead(at):
        where = {"position": at, "reads_position": at + 2}
        return Verdict("dead_units", "warning", "d", "", [str(at)], where, None, 0, 9)

    vanishing = Verdict(
        "vanishing_gradients", "error", "v", "", ["0"], {"last_starved_position": 20}, None, 0, 9
    )
    after = rank([dead(18), vanishing])  # starved: up to the layer that reads the zeros
    assert [v.id for v in after] == ["dead_units"] and after[0].explains == ["vanishing_gradients"]
    within = rank([dead(12), vanishing])
    assert [v.id for v in within] == ["vanishing_gradients"]
    assert within[0].explains == ["dead_units"]
