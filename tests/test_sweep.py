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


# -- what trains where a cell fails, from a hand-built run table ------------------------------


def _result(rows):
    import pandas as pd

    from gradscope.lab.sweep import SweepResult

    runs = pd.DataFrame(
        rows, columns=["variant", "depth", "seed", "test_acc", "diverged", "verdicts"]
    ).assign(grad_ratio_init=1e-9, grad_ratio_end=1e-12)
    config = SweepConfig(
        depths=tuple(sorted(set(runs["depth"]))),
        variants=tuple(dict.fromkeys(runs["variant"])),
        seeds=(0, 1),
        dataset="synthetic",
    )
    return SweepResult(config, runs, pd.DataFrame(), pd.DataFrame(), {})


VANISH, EXPLODE = "vanishing_gradients", "exploding_gradients"
RUNS = [
    ("plain", 2, 0, 0.90, False, ""),
    ("plain", 2, 1, 0.92, False, ""),
    ("plain", 6, 0, 0.11, False, VANISH),  # chance (and vanishing): fails
    ("plain", 6, 1, 0.12, False, VANISH),
    ("plain", 10, 0, 0.10, True, ""),  # diverged: fails
    ("plain", 10, 1, 0.10, True, ""),
    ("residual", 6, 0, 0.95, False, ""),
    ("residual", 6, 1, 0.95, False, ""),
    ("residual", 10, 0, 0.60, False, ""),  # healthy words but 40% on average: not a fix
    ("residual", 10, 1, 0.20, False, ""),
    ("preln", 6, 0, 0.97, False, ""),
    ("preln", 6, 1, 0.97, False, ""),
    ("preln", 10, 0, 0.96, False, EXPLODE),  # one seed exploding, one healthy: a tie
    ("preln", 10, 1, 0.96, False, ""),
]


def test_what_trains_names_the_variants_that_train_at_a_failing_depth():
    table = _result(RUNS).what_trains()
    got = [(r.variant, r.depth, r.word, r.fix, round(r.fix_acc, 2)) for r in table.itertuples()]
    # preln at depth 10: its seeds say "exploding" and "healthy", a tie that mode() settles
    # alphabetically ("exploding"): a failing cell, and nothing else trains at depth 10
    assert got[:2] == [
        ("plain", 6, "chance", "preln", 0.97),
        ("plain", 6, "chance", "residual", 0.95),
    ]
    rest = {(r[0], r[1]): r for r in got[2:]}
    assert set(rest) == {("plain", 10), ("preln", 10)}
    assert rest["plain", 10][2:4] == ("diverged", "") and rest["preln", 10][2:4] == (
        "exploding",
        "",
    )
    assert table.set_index(["variant", "depth"]).loc[("plain", 6), "trains_to"].tolist() == [2, 2]
    assert table.groupby("variant")["trains_to"].first()["preln"] == 6
    code = table[table["fix"] == "preln"]["code"].iloc[0]
    assert code.startswith("x = x + block(norm(x))") and "LayerNorm" in code


def test_a_healthy_sweep_has_no_failing_cell_and_the_report_says_so():
    from gradscope.report.sweep import what_trains_html

    healthy = _result([r for r in RUNS if r[0] != "plain" and r[1] == 6])
    assert healthy.what_trains().empty
    assert "no failing cell" in what_trains_html(healthy).lower()
    page = what_trains_html(_result(RUNS))
    assert "<b>plain at depth 6</b>: stays at chance" in page
    assert "these train: preln 97.0%, residual 95.0%" in page
    assert "Nothing in this sweep trains at depth 10" in page
    assert "The deepest plain that trains here: depth 2." in page


def test_a_sweep_run_in_this_process_gives_back_its_thread_count(tmp_path):
    """Each run trains on one thread (results must not depend on how runs were spread); a
    sweep in the caller's own process (workers=1) puts the caller's count back."""
    import torch

    from gradscope.lab.sweep import run_sweep

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = SweepConfig(depths=(2,), variants=("plain",), steps=2, dataset="synthetic")
        run_sweep(config, tmp_path / "sweep", workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
