"""Quick versions of `gradscope reproduce` on real MNIST, checking the claims' directions."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from gradscope.cli import app
from gradscope.lab.reproduce import binomial_se, verdict

runner = CliRunner()


def _reproduce(name, out, mnist_root, *extra):
    args = ["reproduce", name, "--quick", "--data-root", str(mnist_root), "--out", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for f in ("table.csv", "runs.csv", "frame.parquet", "report.html", "config.json"):
        assert (out / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "https://" not in html
    return pd.read_csv(out / "table.csv").set_index("experiment"), pd.read_csv(out / "runs.csv")


def test_verdict_uses_seed_spread_and_binomial_error():
    se = binomial_se(0.936, 10000)
    assert se == pytest.approx((0.936 * 0.064 / 10000) ** 0.5)
    assert verdict(0.936 + 1.9 * se, 0.0, 0.936, 10000) == "reproduced"
    assert verdict(0.936 + 2.1 * se, 0.0, 0.936, 10000) == "higher than published"
    assert verdict(0.90, 0.001, 0.936, 10000) == "lower than published"
    assert verdict(0.93, 0.01, 0.936, 10000) == "reproduced"


def test_journey_quick(tmp_path, mnist_root):
    table, runs = _reproduce("journey", tmp_path / "j", mnist_root, "--seeds", "0")
    assert list(table.index) == [
        "digit, SGD",
        "digit, Adam",
        "digit, AdamW wd 0.01",
        "digit, AdamW + cosine",
        "deep-digit, AdamW + cosine",
    ]
    assert table["test_published"].tolist() == [0.936, 0.974, 0.976, 0.978, 0.981]
    assert set(table["test_verdict"]) <= {
        "reproduced",
        "higher than published",
        "lower than published",
    }
    frame = pd.read_parquet(tmp_path / "j" / "frame.parquet")
    assert {"param_grad", "update"} <= set(frame["kind"]) and frame["experiment"].nunique() == 5


def test_dropout_narrows_the_generalization_gap(tmp_path, mnist_root):
    # 20 epochs: the direction held for each of seeds 0-4 (by 0.1 to 0.8 points), while at
    # 50-100 epochs it does not; see the note on issue 5
    table, runs = _reproduce("dropout", tmp_path / "d", mnist_root, "--seeds", "0,1,2")
    assert (runs["train_size"] == 1000).all()
    assert table.loc["digit-dropout 0.2", "gap_mean"] < table.loc["digit, no dropout", "gap_mean"]


def test_l1_yields_more_exact_zeros_than_l2(tmp_path, mnist_root):
    table, _ = _reproduce("regularization", tmp_path / "r", mnist_root, "--seeds", "0")
    l2 = table.loc["L2: AdamW wd 0.01"]
    prox = table.loc["L1 proximal 0.1"]
    penalty = table.loc["L1 penalty 0.0001"]
    assert prox["exact_zero_frac"] > 0.01 > l2["exact_zero_frac"]
    assert penalty["near_zero_frac"] > l2["near_zero_frac"]
    assert prox["weight_norm"] < l2["weight_norm"]


def test_clipping_bounds_the_applied_update(tmp_path, mnist_root):
    out = tmp_path / "c"
    table, runs = _reproduce("clipping", out, mnist_root, "--seeds", "0")
    updates = pd.read_parquet(out / "updates.parquet")
    clipped = updates[updates["experiment"] == "clip at 1"]["update_norm"]
    # SGD momentum 0.9, lr 0.05: a clipped gradient moves the weights by at most 0.05 / 0.1
    assert clipped.max() <= 0.05 * 1.0 / (1 - 0.9) * (1 + 1e-6)
    assert table.loc["clip at 1", "finite_runs"] == 1
    losses = pd.read_parquet(out / "losses.parquet")
    unclipped = losses[losses["experiment"] == "no clipping"]["preclip_norm"]
    assert unclipped.max() > 10 * losses[losses["experiment"] == "clip at 1"]["preclip_norm"].max()


def test_reproduce_bad_input(tmp_path):
    result = runner.invoke(
        app, ["reproduce", "journey", "--seeds", "a", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = runner.invoke(
        app, ["reproduce", "dropout", "--data-root", str(tmp_path), "--out", str(tmp_path / "y")]
    )
    assert result.exit_code == 2 and "GRADSCOPE_DATA" in result.output


def test_options_reach_the_experiments(tmp_path):
    import json

    for name, option, key, value in (
        ("regularization", "--l1-proximal", "L1 proximal 0.3", 0.3),
        ("journey", "--lr-sgd", "digit, SGD", 0.02),
    ):
        out = tmp_path / name
        args = [
            "reproduce",
            name,
            "--quick",
            "--dataset",
            "synthetic",
            "--seeds",
            "0",
            option,
            str(value),
            "--out",
            str(out),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        settings = json.loads((out / "config.json").read_text())["experiments"]
        assert key in settings
        assert value in (settings[key]["l1"], settings[key]["lr"])
