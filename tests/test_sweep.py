"""The sweep's output folder: resume accepts only the configuration that made it."""

import dataclasses

import pytest

from gradscope.lab.sweep import SweepConfig, SweepError, prepare_out

BASE = SweepConfig(depths=(2, 6), variants=("plain", "preln"))
# one changed value for every field of SweepConfig
CHANGES = {
    "depths": (2, 8),
    "variants": ("plain",),
    "width": 64,
    "activation": "tanh",
    "init": "kaiming",
    "optimizer": "adam",
    "lr": 0.01,
    "steps": 400,
    "epochs": 2,
    "batch_size": 64,
    "seeds": (0, 1),
    "dataset": "synthetic",
    "every": 10,
    "eval_train_size": 1000,
}


def test_every_config_field_is_checked_below():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(SweepConfig)}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_resume_rejects_a_change_to_any_field(tmp_path, field):
    out = tmp_path / "sweep"
    prepare_out(out, BASE, resume=False)
    changed = dataclasses.replace(BASE, **{field: CHANGES[field]})
    assert changed != BASE
    with pytest.raises(SweepError, match=rf"differs in: {field}\)"):
        prepare_out(out, changed, resume=True)
    prepare_out(out, BASE, resume=True)  # the same configuration goes on
