"""Trials run on copies, are deterministic, rank remedies by their measured gain, and go on
past a remedy that cannot apply."""

from __future__ import annotations

import math

import pytest
import torch
from remedy_loops import data as _data
from remedy_loops import forgetful_step as _forgetful_step
from remedy_loops import mlp as _mlp
from remedy_loops import step as _step
from torch import nn

import gradscope as gs
from gradscope.remedies import REMEDIES, Context, Remedy, TrialError


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
    # (every parameter is in the optimizer; the optimizer is SGD, not an adaptive one)
    cannot = ("add_missing_params", "adam_default_lr")
    assert all(r.skipped is None for r in trial.runs[1:] if r.name not in cannot)
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
    from gradscope.remedies.copies import copy_start

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    own = model[0].register_forward_hook(lambda m, i, o: None)  # the user's own: kept
    with gs.watch(model, optimizer=opt):
        _step(model, opt, _data(1)[0])
        copy, _ = copy_start(lambda: (model, opt))
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in copy.modules()] == [
        0,
        1,
        0,
        0,
    ]
    assert all(not p._post_accumulate_grad_hooks for p in copy.parameters())
    own.remove()
