"""The recorder follows the user's loop: optimizers made again, model surgery, `every`."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradscope as gs


def _batch(model: nn.Module) -> None:
    model(torch.randn(5, 4)).pow(2).sum().backward()


@pytest.mark.parametrize("given", [False, True])
def test_an_optimizer_made_again_each_epoch_takes_over_with_one_note(given):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gs.watch(model, optimizer=opt if given else None) as rec:
            for _epoch in range(3):
                for _ in range(5):
                    opt.zero_grad()
                    _batch(model)
                    opt.step()
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # each epoch anew
    assert sorted(rec.to_frame()["step"].unique()) == list(range(15))  # no step lost
    notes = [w for w in caught if "takes over" in str(w.message) or "a new" in str(w.message)]
    assert len(notes) == 1 and "closes the steps from now on" in str(notes[0].message)
    assert rec.model_summary["optimizer"] == "Adam"


def test_the_update_of_the_new_optimizer_is_recorded():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    old = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gs.watch(model, every=1) as rec:
            _batch(model)
            old.step()
            new = torch.optim.SGD(model.parameters(), lr=0.001)
            new.zero_grad()
            before = model.weight.detach().clone()
            _batch(model)
            new.step()
            after = model.weight.detach().clone()
    f = rec.to_frame()
    norm = f[(f.step == 1) & (f.layer == "weight") & (f.kind == "update") & (f.stat == "norm")]
    assert len(norm) == 1
    assert norm["value"].iloc[0] == pytest.approx(float((after - before).norm()), rel=1e-5)


def test_a_layer_replaced_and_one_appended_after_attach_are_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gs.watch(model) as rec:
            for step in range(6):
                if step == 2:
                    model[2] = nn.Linear(4, 3)  # replaced
                    model.append(nn.Linear(3, 2))  # appended
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                opt.zero_grad()
                _batch(model)
                opt.step()
    f = rec.to_frame()
    grads = f[(f.kind == "param_grad") & (f.stat == "norm")]
    assert set(grads[grads.step == 5].layer) - {"*"} == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "3.weight",
        "3.bias",
    }
    assert "3" in set(f[(f.step == 5) & (f.kind == "activation")].layer)
    assert sorted(f.step.unique()) == list(range(6))
    changed = [w for w in caught if "changed after attach" in str(w.message)]
    assert len(changed) == 1


def test_a_parameter_replaced_is_followed_from_its_first_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gs.watch(model) as rec:
            for step in range(3):
                if step == 1:
                    model.weight = nn.Parameter(torch.full((2, 4), 0.5))
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                opt.zero_grad()
                _batch(model)
                seen[step] = (model.weight.detach().norm(), model.weight.grad.norm())
                opt.step()
    f = rec.to_frame()
    w = f[(f.layer == "weight") & (f.stat == "norm")].set_index(["step", "kind"])["value"]
    for step in (1, 2):  # the new parameter, not the old one (or its stale gradient)
        assert w[(step, "param")] == pytest.approx(float(seen[step][0]), rel=1e-5)
        assert w[(step, "param_grad")] == pytest.approx(float(seen[step][1]), rel=1e-5)


@pytest.mark.parametrize("every", [1.5, 0, -2, True, "3", 2.0])
def test_every_must_be_a_positive_int_or_a_callable(every):
    with pytest.raises(ValueError, match="every must be an integer >= 1 or a callable"):
        gs.Recorder(every=every)


def test_every_accepts_ints_and_callables():
    import numpy as np

    assert gs.Recorder(every=np.int64(3)).every == 3
    assert callable(gs.Recorder(every=lambda s: s % 2 == 0).every)
