"""Remedies do what they say on tiny models (checked against the change written directly in
torch), say what and how, and only warnings and errors propose them."""

from __future__ import annotations

import math

import pytest
import torch
from remedy_loops import data as _data
from remedy_loops import forgetful_step as _forgetful_step
from remedy_loops import mlp as _mlp
from torch import nn

from gradscope.remedies import (
    PROPOSALS,
    REMEDIES,
    CannotApply,
    Context,
    needed,
    propose,
    remedy,
)
from gradscope.verdict import Verdict

# -- each remedy on a tiny model -----------------------------------------------------------


def _one_update(model: nn.Module, opt: torch.optim.Optimizer, grad_scale: float = 1.0) -> dict:
    """Runs one step on a fixed batch; returns each parameter's update."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _data(1)[0]
    opt.zero_grad()
    (grad_scale * nn.functional.cross_entropy(model(x), y)).backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, factor", [("lr_x0.3", 0.3), ("lr_x0.1", 0.1)])
def test_lr_scale_scales_the_update(name: str, factor: float) -> None:
    torch.manual_seed(0)
    a = _mlp()
    b = _mlp()
    b.load_state_dict(a.state_dict())
    plain = _one_update(a, torch.optim.SGD(a.parameters(), lr=0.5))
    opt = REMEDIES[name].apply(b, torch.optim.SGD(b.parameters(), lr=0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * factor)
    scaled = _one_update(b, opt)
    for n in plain:
        torch.testing.assert_close(scaled[n], factor * plain[n])


def test_warmup_is_linear_then_the_base_rate() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = REMEDIES["warmup"].apply(model, torch.optim.SGD(model.parameters(), lr=0.2), Context(50))
    length = 10  # a fifth of 50 steps
    seen = []
    for _ in range(length + 3):
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        opt.step()
        seen.append(float((before - model.weight.detach()).mean()))
    expected = [0.2 * min(1.0, (k + 1) / length) for k in range(length + 3)]
    assert seen == pytest.approx(expected, rel=1e-5)


def test_clip_bounds_the_update_at_norm_one() -> None:
    torch.manual_seed(0)
    model = _mlp()
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    opt = REMEDIES["clip_1.0"].apply(model, torch.optim.SGD(model.parameters(), lr=1.0))
    update = _one_update(model, opt, grad_scale=1e3)
    total = math.sqrt(sum(float(u.square().sum()) for u in update.values()))
    assert total == pytest.approx(1.0, rel=1e-4)
    # the same direction as the raw gradient (torch's own clip, written out)
    raw = _one_update(ref, torch.optim.SGD(ref.parameters(), lr=1.0), grad_scale=1e3)
    norm = math.sqrt(sum(float(u.square().sum()) for u in raw.values()))
    for n in raw:
        torch.testing.assert_close(update[n], raw[n] / norm, rtol=1e-4, atol=1e-7)


def test_zero_grad_makes_each_update_use_only_its_own_gradient() -> None:
    torch.manual_seed(0)
    model = _mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = REMEDIES["zero_grad"].apply(model, torch.optim.SGD(model.parameters(), lr=0.0))
    batches = _data(3)
    for batch in batches:
        _forgetful_step(model, opt, batch)
    # lr 0: the weights stay at the start, so the last batch's own gradient is the reference
    ref = _mlp()
    ref.load_state_dict(start)
    nn.functional.cross_entropy(ref(batches[-1][0]), batches[-1][1]).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_zero_grad_keeps_micro_batches_accumulated_before_one_update() -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = REMEDIES["zero_grad"].apply(model, torch.optim.SGD(model.parameters(), lr=0.0))
    a, b = _data(2)
    for x, y in (a, b):  # two micro-batches, one update
        nn.functional.cross_entropy(model(x), y).backward()
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    for x, y in (a, b):
        nn.functional.cross_entropy(ref(x), y).backward()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_add_missing_params_puts_the_forgotten_layer_in_the_optimizer() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt = REMEDIES["add_missing_params"].apply(model, opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert opt.param_groups[-1]["lr"] == 0.1
    update = _one_update(model, opt)
    assert float(update["2.weight"].abs().sum()) > 0


def test_unfreeze_trains_a_frozen_layer() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    opt = REMEDIES["unfreeze"].apply(model, torch.optim.SGD(model[2].parameters(), lr=0.1))
    assert all(p.requires_grad for p in model.parameters())
    assert float(_one_update(model, opt)["0.weight"].abs().sum()) > 0


def test_sgd_to_adamw_keeps_the_parameters() -> None:
    model = _mlp()
    opt = REMEDIES["sgd_to_adamw"].apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["lr"] == 1e-3
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_remove_zero_lr_also_under_a_schedule_that_sets_zero() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else 0.0)
    opt = REMEDIES["remove_zero_lr"].apply(model, opt)
    moved = []
    for _ in range(5):
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        opt.step()
        schedule.step()
        moved.append(float((before - model.weight.detach()).mean()))
    assert moved == pytest.approx([0.1] * 5)  # without the remedy: 0.1, 0.1, 0, 0, 0
    assert opt.param_groups[0]["lr"] == 0.0  # the schedule's own value, put back


def test_cap_lr_undoes_a_mid_run_increase() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = REMEDIES["cap_lr"].apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    moved = []
    for k in range(4):
        if k == 2:
            opt.param_groups[0]["lr"] *= 100
        if k == 3:
            opt.param_groups[0]["lr"] = 0.01  # decreases pass through
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        opt.step()
        moved.append(float((before - model.weight.detach()).mean()))
    assert moved == pytest.approx([0.1, 0.1, 0.1, 0.01])


def test_standardize_inputs_uses_the_first_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    ref = nn.Linear(6, 2)
    ref.load_state_dict(model.state_dict())
    REMEDIES["standardize_inputs"].apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first, second = torch.randn(16, 6) * 50 + 200, torch.randn(16, 6) * 50 + 200
    mean, std = first.double().mean(), first.double().std()
    for x in (first, second):  # the second batch: still the first batch's statistics
        expected = ref(((x.double() - mean) / std).float())
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    ids = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    REMEDIES["standardize_inputs"].apply(ids, torch.optim.SGD(ids.parameters(), lr=0.1))
    with pytest.raises(CannotApply, match="not a floating-point tensor"):
        ids(torch.tensor([[1, 2]]))


def test_remove_zero_lr_gives_zero_groups_the_working_rate() -> None:
    model = _mlp()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.05
    )
    opt = REMEDIES["remove_zero_lr"].apply(model, opt)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    only_zero = torch.optim.Adam(model.parameters(), lr=0.0)
    assert REMEDIES["remove_zero_lr"].apply(model, only_zero).param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    "act, gain", [(nn.ReLU, math.sqrt(2.0)), (nn.Tanh, 5.0 / 3.0), (nn.Sigmoid, 4.0)]
)
def test_reinit_matched_uses_the_activations_init(act: type[nn.Module], gain: float) -> None:
    model = nn.Sequential(nn.Linear(400, 300), act(), nn.Linear(300, 300))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model[0].weight]["momentum_buffer"] = torch.ones(300, 400)
    REMEDIES["reinit_matched"].apply(model, opt)
    w = model[0].weight
    # kaiming normal (fan in) before a ReLU, xavier normal before a bounded activation
    kaiming, xavier = gain / math.sqrt(400), gain * math.sqrt(2.0 / (400 + 300))
    expected = kaiming if act is nn.ReLU else xavier
    assert float(w.std()) == pytest.approx(expected, rel=0.02)
    assert float(w.mean()) == pytest.approx(0.0, abs=expected * 0.02)
    # the last layer has no activation after it: xavier with gain 1
    assert float(model[2].weight.std()) == pytest.approx(math.sqrt(2.0 / 600), rel=0.02)
    assert float(model[0].bias.abs().max()) == 0.0
    assert model[0].weight not in opt.state  # stale momentum dropped


def test_reinit_orthogonal_is_orthogonal_with_the_gain() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    REMEDIES["reinit_orthogonal"].apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    w = model[0].weight.detach().double()
    torch.testing.assert_close(w @ w.T, (5.0 / 3.0) ** 2 * torch.eye(64, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    "name, make, why",
    [
        ("cap_lr", lambda m: torch.optim.SGD(m.parameters(), lr=0.0), "zero"),
        ("sgd_to_adamw", lambda m: torch.optim.Adam(m.parameters()), "not plain SGD"),
        ("add_missing_params", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "already"),
        ("unfreeze", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "requires_grad"),
        ("lr_x0.3", lambda m: torch.optim.SGD(m.parameters(), lr=0.0), "zero"),
        ("warmup", lambda m: torch.optim.SGD(m.parameters(), lr=0.0), "zero"),
    ],
)
def test_cannot_apply_says_why(name: str, make, why: str) -> None:  # type: ignore[no-untyped-def]
    model = _mlp()
    with pytest.raises(CannotApply, match=why):
        REMEDIES[name].apply(model, make(model))


def test_reinit_cannot_apply_without_linear_or_conv_layers() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(CannotApply, match="no Linear or Conv"):
        REMEDIES["reinit_matched"].apply(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_every_remedy_says_what_and_how() -> None:
    for name, r in REMEDIES.items():
        assert r.name == name and len(r.description) > 20 and r.code
        compile(r.code.split("#")[0].strip(), name, "exec")  # the line is Python
    # every proposal names a remedy that exists
    assert {n for names in PROPOSALS.values() for n in names} <= set(REMEDIES)
    with pytest.raises(KeyError, match="no remedy 'nope'"):
        remedy("nope")


def test_proposals_come_from_warnings_only_and_tolerate_unknown_ids() -> None:
    healthy = [Verdict("healthy", "ok", "fine", "")]
    assert propose(healthy) == []
    assert propose([Verdict("some_future_rule", "error", "x", "")]) == []
    assert propose([Verdict("frozen_parameters", "info", "x", "")]) == []
    verdicts = [
        Verdict("loss_spike", "warning", "x", ""),
        Verdict("nonfinite_values", "error", "x", ""),
    ]
    names = [r.name for r in propose(verdicts)]
    assert names[:3] == ["lr_x0.1", "clip_1.0", "warmup"]  # the error's remedies first
    assert names[3] == "lr_x0.3" and len(names) == len(set(names))
    assert len(propose(verdicts, limit=2)) == 2


def test_a_spike_the_run_got_over_proposes_nothing() -> None:
    spike = Verdict("gradient_spike", "warning", "x", "", first_step=20)
    # the reference, written out: the last tenth's mean against the tenth before step 20
    recovered = [2.0 - 0.02 * t for t in range(20)] + [5.0] + [1.0 - 0.01 * t for t in range(19)]
    stuck = recovered[:21] + [3.0] * 19
    diverged = recovered[:21] + [math.inf] * 19
    assert sum(recovered[-4:]) / 4 < sum(recovered[16:20]) / 4 < sum(stuck[-4:]) / 4
    assert not needed(spike, recovered) and propose([spike], losses=recovered) == []
    assert needed(spike, stuck) and needed(spike, diverged)
    assert [r.name for r in propose([spike], losses=stuck)][:1] == ["clip_1.0"]
    assert needed(spike)  # without losses the verdict alone decides
    # other verdicts are not events: a lower final loss does not silence them
    assert needed(Verdict("dead_units", "warning", "x", "", first_step=20), recovered)
    assert not needed(Verdict("gradient_spike", "info", "x", "", first_step=20), stuck)


def test_adam_default_lr_caps_an_adaptive_optimizers_rate_only() -> None:
    model = _mlp()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 0.3}, {"params": model[2].parameters()}],
        lr=1e-4,
    )
    assert REMEDIES["adam_default_lr"].apply(model, opt) is opt
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]  # only the rate above it
    with pytest.raises(CannotApply, match="not an adaptive one"):
        REMEDIES["adam_default_lr"].apply(model, torch.optim.SGD(model.parameters(), lr=3.0))
    with pytest.raises(CannotApply, match="already at most"):
        REMEDIES["adam_default_lr"].apply(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
