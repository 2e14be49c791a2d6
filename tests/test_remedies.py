"""Remedies do what they say on tiny models (checked against the change written directly in
torch); trials run on copies, are deterministic, and go on past a remedy that cannot apply."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.remedies import (
    PROPOSALS,
    REMEDIES,
    CannotApply,
    Context,
    Remedy,
    TrialError,
    propose,
    remedy,
)
from gradscope.verdict import Verdict


def _mlp(act: type[nn.Module] = nn.ReLU, width: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), act(), nn.Linear(width, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss


def _forgetful_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss


def _data(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


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
    "act, gain", [(nn.ReLU, math.sqrt(2.0)), (nn.Tanh, 5.0 / 3.0), (nn.Sigmoid, 1.0)]
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


# -- trials -------------------------------------------------------------------------------


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        repr(opt.state_dict()),
        [p.grad for p in model.parameters()],
        len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks),
        len(model._forward_pre_hooks) + len(model._forward_hooks),
        [p.requires_grad for p in model.parameters()],
        type(opt),
    )


def test_a_trial_never_changes_the_users_model_or_optimizer() -> None:
    torch.manual_seed(0)
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(
        [{"params": model[2].parameters(), "lr": 0.1}, {"params": model[0].parameters(), "lr": 0}]
    )
    before = _state(model, opt)
    trial = gs.try_remedies(lambda: (model, opt), _step, _data(), steps=12, remedies=list(REMEDIES))
    assert all(r.skipped is None for r in trial.runs[1:] if r.name != "add_missing_params")
    after = _state(model, opt)
    for a, b in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(a, b)
    assert before[1:] == after[1:]


def test_a_trial_is_deterministic_given_the_seed() -> None:
    def make():  # type: ignore[no-untyped-def]
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    def batches():  # type: ignore[no-untyped-def]
        return iter(torch.utils.data.DataLoader(_loader_data(), batch_size=8, shuffle=True))

    names = ["lr_x0.3", "warmup", "reinit_matched"]
    a = gs.try_remedies(make, _step, batches, steps=15, remedies=names, seed=3)
    b = gs.try_remedies(make, _step, batches, steps=15, remedies=names, seed=3)
    c = gs.try_remedies(make, _step, batches, steps=15, remedies=names, seed=4)
    for x, y in zip(a.runs, b.runs, strict=True):
        assert x.losses == y.losses and [v.id for v in x.verdicts] == [v.id for v in y.verdicts]
    ta, tb = a.table().drop(columns="seconds"), b.table().drop(columns="seconds")
    assert ta.equals(tb)
    assert a.baseline.losses != c.baseline.losses  # the seed reaches init, dropout and order


def _loader_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(
        torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    )


def test_a_trial_ranks_remedies_and_says_worse() -> None:
    """lr 40 on a small MLP diverges or thrashes: a lower rate beats it; a lower rate on a
    run at a good rate is worse (slower)."""
    data = _data(16)

    def make_at(lr: float):  # type: ignore[no-untyped-def]
        def make():  # type: ignore[no-untyped-def]
            model = _mlp()
            return model, torch.optim.SGD(model.parameters(), lr=lr)

        return make

    hot = gs.try_remedies(make_at(40.0), _step, data, steps=60, remedies=["lr_x0.1", "lr_x0.3"])
    table = hot.table()
    assert list(table["remedy"]) == ["baseline", "lr_x0.1", "lr_x0.3"]
    assert hot.best is not None and hot.best.name in {"lr_x0.1", "lr_x0.3"}
    assert table.set_index("remedy").loc[hot.best.name, "outcome"] == "better"
    calm = gs.try_remedies(make_at(0.05), _step, data, steps=60, remedies=["lr_x0.1"])
    assert calm.table().loc[1, "outcome"] == "worse" and calm.table().loc[1, "gain"] < 0
    assert calm.best is None


def test_a_remedy_that_cannot_apply_or_fails_leaves_the_others() -> None:
    def broken(model, opt, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    bad = Remedy("broken", "raises when applied", "pass", broken)
    trial = gs.try_remedies(
        lambda: (lambda m: (m, torch.optim.SGD(m.parameters(), lr=0.1)))(_mlp()),
        _step,
        _data(),
        steps=10,
        remedies=["unfreeze", bad, "lr_x0.3"],
    )
    table = trial.table().set_index("remedy")
    assert (
        table.loc["unfreeze", "outcome"] == "could not apply: no parameter has requires_grad=False"
    )
    assert table.loc["broken", "outcome"].startswith("failed: applying it raised RuntimeError")
    assert math.isnan(table.loc["broken", "final_loss"])
    assert table.loc["lr_x0.3", "outcome"] in {"better", "worse", "no change"}
    assert len(trial.runs[3].losses) == 10


def test_proposed_remedies_for_a_forgotten_zero_grad_fix_it() -> None:
    """No remedies= : the baseline's verdicts choose. Gradients summed over steps make SGD's
    steps grow until the run thrashes; zeroing them brings the loss down."""
    data = _data(8, seed=2)

    def make():  # type: ignore[no-untyped-def]
        model = _mlp(width=32)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    trial = gs.try_remedies(make, _forgetful_step, data, steps=80, remedies=None)
    names = [r.name for r in trial.runs[1:]]
    assert "zero_grad" in names, trial.baseline.verdicts
    assert trial.table().set_index("remedy").loc["zero_grad", "outcome"] == "better"


def test_a_healthy_run_gets_no_remedies() -> None:
    data = _data(8)

    def make():  # type: ignore[no-untyped-def]
        model = _mlp()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    trial = gs.try_remedies(make, _step, data, steps=60)
    assert [v.id for v in trial.baseline.verdicts] == ["healthy"]
    assert len(trial.runs) == 1 and trial.best is None


def test_eval_adds_accuracy() -> None:
    x, y = _data(1)[0]

    def accuracy(model: nn.Module) -> float:
        return float((model(x).argmax(1) == y).float().mean())

    trial = gs.try_remedies(
        lambda: (lambda m: (m, torch.optim.SGD(m.parameters(), lr=0.1)))(_mlp()),
        _step,
        _data(),
        steps=10,
        remedies=["lr_x0.3"],
        eval=accuracy,
    )
    acc = trial.table()["accuracy"]
    assert ((acc >= 0) & (acc <= 1)).all()


def test_workers_give_the_same_runs() -> None:
    def make():  # type: ignore[no-untyped-def]
        model = _mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.3)

    names = ["lr_x0.3", "clip_1.0", "warmup"]
    serial = gs.try_remedies(make, _step, _data(), steps=10, remedies=names)
    forked = gs.try_remedies(make, _step, _data(), steps=10, remedies=names, workers=2)
    assert [r.remedy.name for r in forked.runs[1:]] == names  # type: ignore[union-attr]
    for a, b in zip(serial.runs, forked.runs, strict=True):
        assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_bad_arguments_are_named() -> None:
    model = _mlp()
    good = (model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TrialError, match="one-shot iterator"):
        gs.try_remedies(lambda: good, _step, iter(_data()), steps=5)
    with pytest.raises(TrialError, match="not a torch.optim.Optimizer"):
        gs.try_remedies(lambda: (model, None), _step, _data(), steps=5)
    with pytest.raises(TrialError, match="return \\(model, optimizer\\)"):
        gs.try_remedies(lambda: model, _step, _data(), steps=5)
    with pytest.raises(TrialError, match="baseline run failed: ValueError"):
        gs.try_remedies(lambda: good, lambda m, o, b: int("x"), _data(), steps=5)
    with pytest.raises(TrialError, match="yielded nothing"):
        gs.try_remedies(lambda: good, _step, [], steps=5)
    with pytest.raises(KeyError, match="no remedy"):
        gs.try_remedies(lambda: good, _step, _data(), steps=5, remedies=["nope"])


def test_warmup_leaves_the_loops_own_schedule_working() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = REMEDIES["warmup"].apply(model, torch.optim.SGD(model.parameters(), lr=0.2), Context(50))
    steps = []
    for k in range(14):
        if k == 5:
            opt.param_groups[0]["lr"] *= 3  # the loop's own change, mid-warm-up
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        opt.step()
        steps.append(float((before - model.weight.detach()).mean()))
    expected = [(0.2 if k < 5 else 0.6) * min(1.0, (k + 1) / 10) for k in range(14)]
    assert steps == pytest.approx(expected, rel=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)


def test_a_trial_inside_a_watch_leaves_the_users_recording_alone() -> None:
    """The user's model is being recorded when the trial starts: the trial's training must
    not land in that recording (a deep copy would share the recorder's hook closures)."""

    def run(with_trial: bool):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = _data(4)
        with gs.watch(model, optimizer=opt) as rec:
            _step(model, opt, data[0])
            if with_trial:
                gs.try_remedies(lambda: (model, opt), _step, data, steps=6, remedies=["lr_x0.3"])
            _step(model, opt, data[1])
        return rec.to_frame()

    plain, tried = run(False), run(True)
    assert len(plain) and plain.equals(tried)


def test_the_copies_carry_no_hooks_of_a_recorder_watching_the_users_model() -> None:
    from gradscope.remedies.trial import _Spec, _start

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    own = model[0].register_forward_hook(lambda m, i, o: None)  # the user's own: kept
    with gs.watch(model, optimizer=opt):
        _step(model, opt, _data(1)[0])
        spec = _Spec(lambda: (model, opt), _step, _data(), 4, 0, None, 1)
        copy, _ = _start(spec)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in copy.modules()] == [
        0,
        1,
        0,
        0,
    ]
    assert all(not p._post_accumulate_grad_hooks for p in copy.parameters())
    own.remove()
