"""The rules of gradscope.analysis, each against an independent reference: real small runs
checked in plain torch (which module's backward made the NaN, whether gradients were summed
over steps), hand-built frames either side of a threshold, the root-cause ranking, the online
diagnosis and the fault benchmark's registry."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.analysis import OnlineDiagnosis, findings, render
from gradscope.analysis.rank import rank
from gradscope.analysis.rules import accumulation, instability
from gradscope.analysis.view import RunView
from gradscope.verdict import Verdict

COLUMNS = ["step", "layer", "kind", "stat", "value"]


class NormFeature(nn.Module):
    """Appends each sample's L2 norm (no epsilon: its backward is 0/0 at an all-zero row)."""

    def forward(self, x):
        return torch.cat([x, x.pow(2).sum(1, keepdim=True).sqrt()], 1)


def _train(model, opt, batches, step=None, **watch):
    with gs.watch(model, optimizer=opt, **watch) as rec:
        for x, y in batches:
            if step is None:
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.log_scalar("loss", loss)
                opt.step()
            else:
                step(model, opt, x, y, rec)
    return rec


def _batches(n, batch=32, d=16, seed=0):
    """A learnable task: the class is the largest of the first four features."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)
        out.append((x, x[:, :4].argmax(1)))
    return out


def test_nonfinite_backward_is_blamed_on_the_module_whose_backward_made_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), NormFeature(), nn.Linear(9, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = _batches(6)
    batches[4][0][0] = 0.0  # an all-zero sample at step 4: the norm's backward is 0/0
    # the reference, in plain torch: which module's output gradient is finite while the
    # gradient it passes back is not
    probe = {}
    for name, module in model.named_children():
        module.register_full_backward_hook(
            lambda m, gin, gout, name=name: probe.__setitem__(
                name,
                (
                    bool(torch.isfinite(gout[0]).all()),
                    all(g is None or bool(torch.isfinite(g).all()) for g in gin),
                ),
            )
        )
    nn.functional.cross_entropy(model(batches[4][0]), batches[4][1]).backward()
    made = [n for n, (out_ok, in_ok) in probe.items() if out_ok and not in_ok]
    assert made == ["1"]
    for module in model.children():
        module._backward_hooks.clear()
    model.zero_grad()
    rec = _train(model, opt, batches)
    top = rec.diagnose()[0]
    assert (top.id, top.layers, top.first_step) == ("nonfinite_backward", ["1"], 4)
    assert "epsilon" in top.suggestion and "learning rate will not" in top.suggestion


def test_nonfinite_forward_names_the_module_that_made_it():
    class LogAt(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.log(x - 10.0) if self.calls == 3 else x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), LogAt(), nn.Linear(8, 4))
    rec = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), _batches(5))
    top = rec.diagnose()[0]
    assert (top.id, top.layers, top.first_step) == ("nonfinite_forward", ["1"], 2)


def _accumulating_step(zero: bool, micro: int = 1):
    def step(model, opt, x, y, rec):
        if zero:
            opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            loss = nn.functional.cross_entropy(model(xs), ys) / micro
            loss.backward()
        rec.log_scalar("loss", loss)
        opt.step()

    return step


def test_kappa_matches_a_direct_torch_computation_and_stays_under_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = _batches(1)[0]
    # the reference, in torch at the same weights: |grad b| * mean_i |g_i| / |g|^2 with g
    # the gradient w.r.t. layer 2's output
    ref = copy.deepcopy(model)
    z = ref[2](ref[:2](x))
    z.retain_grad()
    nn.functional.cross_entropy(z, y).backward()
    g = z.grad
    direct = float(ref[2].bias.grad.norm() * g.norm(dim=1).mean() / g.norm() ** 2)
    rec = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), [(x, y)])
    k = accumulation.kappa(RunView(rec.to_frame()))["2"]
    assert float(k.iloc[0]) == pytest.approx(direct, rel=1e-5)
    assert 0 < direct <= 1.0  # the bound one backward pass cannot exceed


def test_gradients_not_zeroed_fires_on_a_forgotten_zero_grad_not_on_accumulation():
    def run(zero, micro):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return _train(model, opt, _batches(30, batch=64), step=_accumulating_step(zero, micro))

    forgot = run(zero=False, micro=1).diagnose()
    assert forgot[0].id == "gradients_not_zeroed" and "zero_grad" in forgot[0].suggestion
    for verdicts in (run(zero=True, micro=4).diagnose(), run(zero=True, micro=1).diagnose()):
        assert "gradients_not_zeroed" not in {v.id for v in verdicts}


def test_optimizer_rules_left_out_lr_zero_and_frozen():
    def run(params, lr=0.05, freeze=False):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )
        if freeze:
            model[0].requires_grad_(False)
        chosen = [p for n, p in model.named_parameters() if params(n) and p.requires_grad]
        return _train(model, torch.optim.SGD(chosen, lr=lr), _batches(12)).diagnose()

    left_out = run(lambda n: not n.startswith("2."))
    assert (left_out[0].id, left_out[0].severity, left_out[0].layers) == (
        "not_in_optimizer",
        "warning",
        ["2"],
    )
    zero = run(lambda n: True, lr=0.0)
    assert (zero[0].id, zero[0].severity) == ("no_updates", "error")
    frozen = run(lambda n: True, freeze=True)
    assert [v.id for v in frozen] == ["healthy", "no_gradient"]
    assert frozen[1].severity == "info" and frozen[1].layers == ["0", "1"]


def _series_frame(series, matrices=("a.weight", "b.weight")):
    rows = []
    for (layer, kind, stat), values in series.items():
        rows += [(s, layer, kind, stat, float(v)) for s, v in enumerate(values)]
    n = max(len(v) for v in series.values())
    rows += [(s, m, "param", "ndim", 2.0) for m in matrices for s in range(n)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _flat(n, level=1.0, seed=0):
    return level * 10 ** np.random.default_rng(seed).normal(0, 0.03, n)


@pytest.mark.parametrize(
    ("factor", "size_factor", "expected"),
    [
        (8.0, 1.0, None),  # under GRAD_JUMP 10 (the series has 7% noise)
        (13.0, 1.0, ("gradient_spike", 30)),
        (13.0, 5.0, ("lr_too_high", 30)),  # the step size jumped too: the learning rate changed
    ],
)
def test_instability_either_side(factor, size_factor, expected):
    n = 40
    grad, size = _flat(n, seed=1), _flat(n, 0.01, seed=2)
    grad[30] *= factor
    size[30:] *= size_factor
    ratio = _flat(n, 1e-3, seed=3)
    frame = _series_frame(
        {
            ("*", "param_grad", "norm"): grad,
            ("a.weight", "param_grad", "norm"): grad,
            ("b.weight", "param_grad", "norm"): grad,
            ("a.weight", "update", "step_size"): size,
            ("b.weight", "update", "step_size"): size,
            ("a.weight", "update", "ratio"): ratio,
            ("b.weight", "update", "ratio"): ratio,
        }
    )
    alarms = [(v.id, v.first_step) for v in gs.diagnose(frame) if v.severity != "ok"]
    assert alarms == ([] if expected is None else [expected])
    assert instability.GRAD_JUMP == 10.0


@pytest.mark.parametrize(("held", "fires"), [(24, False), (26, True)])
def test_vanishing_over_the_run_share_of_steps(held, fires):
    n = 50
    first = np.where(np.arange(n) >= n - held, 1e-5, 1.0)  # late: only the share counts
    frame = _series_frame(
        {("a.weight", "param_grad", "norm"): first, ("b.weight", "param_grad", "norm"): np.ones(n)}
    )
    vanishing = [v for v in gs.diagnose(frame) if v.id == "vanishing_gradients"]
    assert bool(vanishing) == fires
    if fires:
        assert (vanishing[0].first_step, vanishing[0].last_step) == (n - held, n - 1)
        assert "52% of the steps" in vanishing[0].message


@pytest.mark.parametrize(("held", "fires"), [(9, False), (10, True)])
def test_vanishing_from_the_start_that_fades(held, fires):
    n = 50  # (an adaptive optimizer evens the layers out after `held` steps)
    first = np.where(np.arange(n) < held, 1e-5, 1.0)
    frame = _series_frame(
        {("a.weight", "param_grad", "norm"): first, ("b.weight", "param_grad", "norm"): np.ones(n)}
    )
    vanishing = [v for v in gs.diagnose(frame) if v.id == "vanishing_gradients"]
    assert bool(vanishing) == fires
    if fires:
        assert (vanishing[0].first_step, vanishing[0].last_step) == (0, held - 1)


@pytest.mark.parametrize(("rms", "fires"), [(9.0, False), (11.0, True)])
def test_unnormalized_inputs_at_the_first_step(rms, fires):
    frame = _series_frame(
        {
            ("a.weight", "param_grad", "norm"): np.ones(5),
            ("b.weight", "param_grad", "norm"): np.ones(5),
            ("a", "activation", "rms"): [rms, 50.0, 50.0, 50.0, 50.0],  # later steps do not count
        }
    )
    ids = [v.id for v in gs.diagnose(frame)]
    assert ("unnormalized_inputs" in ids) == fires


def test_one_verdict_per_root_cause_with_its_symptoms():
    n = 20
    frame = _series_frame(
        {
            ("a.weight", "param_grad", "norm"): np.zeros(
                n
            ),  # nothing reaches a: b's units are dead
            ("b.weight", "param_grad", "norm"): np.ones(n),
            ("relu", "activation", "dead_units"): np.full(n, 64.0),
            ("relu", "activation", "units"): np.full(n, 64.0),
            ("pool", "activation", "dead_units"): np.full(n, 64.0),  # inherits them
            ("pool", "activation", "units"): np.full(n, 64.0),
            ("*", "scalar", "loss"): np.full(n, 2.3),
        }
    )
    ids = {v.id for v in findings(frame)}
    assert {"dead_units", "vanishing_gradients", "loss_not_decreasing"} <= ids
    (top,) = gs.diagnose(frame)
    assert top.id == "dead_units" and top.layers == ["relu", "pool"]  # where they arise first
    assert set(top.explains) == {"vanishing_gradients", "loss_not_decreasing"}
    assert len(top.evidence["symptoms"]) == 2
    for text in (top.message, render(top)):
        assert "(s)" not in text and "or more" not in text


def test_rank_respects_time_for_timed_causes():
    spike = Verdict("gradient_spike", "warning", "m", "", first_step=30, last_step=59)
    nan_before = Verdict("nonfinite_backward", "error", "m", "", ["x"], first_step=10, last_step=59)
    nan_after = Verdict("nonfinite_backward", "error", "m", "", ["x"], first_step=31, last_step=59)
    assert [v.id for v in rank([spike, nan_after])] == ["gradient_spike"]
    assert sorted(v.id for v in rank([spike, nan_before])) == [
        "gradient_spike",
        "nonfinite_backward",
    ]


def test_render_headline_and_lines():
    v = Verdict(
        "vanishing_gradients",
        "error",
        "the first layer starves",
        "use kaiming",
        ["0", "2", "4", "6"],
        first_step=0,
        last_step=59,
        explains=["loss_not_decreasing"],
    )
    text = render(v)
    assert (
        text.splitlines()[0]
        == "[error] vanishing_gradients (steps 0 to 59; in 0, 2, 4 and 1 more): the first layer starves"
    )
    assert "what to do: use kaiming" in text and "also explains: loss_not_decreasing" in text


def _rows(step, grad, ratio, size, nonfinite=0.0):
    frame = pd.DataFrame(
        [
            (step, "*", "param_grad", "norm", grad),
            (step, "a.weight", "param_grad", "norm", grad),
            (step, "a.weight", "param_grad", "nonfinite", nonfinite),
            (step, "a.weight", "param", "ndim", 2.0),
            (step, "a.weight", "update", "ratio", ratio),
            (step, "a.weight", "update", "step_size", size),
        ],
        columns=COLUMNS,
    )
    return frame


def test_online_warns_at_the_step_and_once():
    online = OnlineDiagnosis()
    got = []
    for t in range(30):
        ratio = 1e-3 if t < 20 else 1e-3 * 50  # the learning rate x50 at step 20
        size = 0.01 if t < 20 else 0.5
        got += [(v.id, v.first_step) for v in online.update(_rows(t, 1.0, ratio, size))]
    assert got == [("lr_too_high", 20)]


def test_online_quiet_on_a_healthy_run_and_cheap_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    fired = []
    _train(
        model, torch.optim.SGD(model.parameters(), lr=0.05), _batches(60), on_verdict=fired.append
    )
    assert fired == []


def test_the_benchmark_registry_is_complete_and_split():
    from benchmarks.faults.registry import CASES, CAUSES, by_name

    healthy = [c for c in CASES if c.healthy]
    faults = [c for c in CASES if not c.healthy]
    assert len(CASES) >= 40 and len(healthy) >= 15
    assert {c.cause for c in faults} == set(CAUSES)
    assert {c.split for c in CASES} == {"tune", "heldout"}
    assert len({c.name for c in CASES}) == len(CASES)
    for c in faults:
        assert c.verdict is not None and (c.step is None or c.step > 0)
    setup = by_name("lr_zero_sgd").build(0)
    loss = setup.step(setup.model, setup.optimizer, setup.batches[0], 0, lambda v: None)
    assert math.isfinite(float(loss)) and setup.steps == len(setup.batches)
    with pytest.raises(KeyError, match="no fault case"):
        by_name("nope")


def test_the_blind_set_is_apart_from_the_registry_and_labelled_alike():
    from benchmarks.faults.blind import BLIND
    from benchmarks.faults.registry import CASES, CAUSES

    names = {c.name for c in BLIND}
    assert len(names) == len(BLIND) and not names & {c.name for c in CASES}
    assert {c.split for c in BLIND} == {"blind"}
    assert sum(c.healthy for c in BLIND) >= 5 and len(BLIND) >= 15
    assert {c.cause for c in BLIND if not c.healthy} <= set(CAUSES)
