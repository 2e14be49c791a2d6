import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_SWEEP as TINY
from typer.testing import CliRunner

from gradscope.cli import app
from gradscope.lab.sweep import RUN_COLUMNS, load_sweep
from gradscope.runs import load_run

runner = CliRunner()


def _sweep(out: Path, *extra: str):
    return runner.invoke(app, ["depth-sweep", *TINY, "--out", str(out), *extra])


def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(out)
    assert result.exit_code == 0, result.output
    for name in ("frame.parquet", "runs.csv", "report.html", "config.json"):
        assert (out / name).is_file()
    frame = pd.read_parquet(out / "frame.parquet")
    assert list(frame.columns) == [
        "variant",
        "depth",
        "seed",
        "step",
        "layer",
        "kind",
        "stat",
        "value",
    ]
    assert set(frame.step) == {0, 4, 8, 11}  # init, every 4 steps, and the last step
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.columns) == RUN_COLUMNS and len(runs) == 4
    assert runs.grad_decay_init.notna().all()
    acc = runs.set_index(["variant", "depth"]).test_acc
    # 12 SGD steps: Pre-LN learns the synthetic problem at both depths; the plain ReLU stack
    # at depth 6 stays near chance (10%), its gradients shrinking towards the input
    assert acc["preln", 2] > 0.9 and acc["preln", 6] > 0.9 and acc["plain", 6] < 0.2
    assert runs.set_index(["variant", "depth"]).grad_decay_init["plain", 6] > 0
    theory = runs.set_index(["variant", "depth"]).grad_decay_theory  # ReLU, default init
    assert theory["plain", 6] == pytest.approx(0.389, abs=0.001) and theory.isna()["preln", 6]
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert html.count("data:image/png;base64,") >= 5
    assert "verdicts at init" in result.output
    # what trains where plain fails, measured from the sweep's own runs: Pre-LN at depth 6
    fixes = load_sweep(out).what_trains()
    assert fixes[["variant", "depth", "word", "fix"]].values.tolist() == [
        ["plain", 6, "chance", "preln"]
    ]
    assert "<b>plain at depth 6</b>: stays at chance" in html
    assert f"these train: preln {acc['preln', 6]:.1%}" in html
    config = json.loads((out / "config.json").read_text())
    assert config["depths"] == [2, 6] and config["variants"] == ["plain", "preln"]
    # the report re-renders from the saved files
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert (out / "report.html").is_file()


def test_resume_skips_finished_runs(tiny_sweep):
    out = tiny_sweep
    # an interruption: two runs never finished (their files are missing)
    for run_id in ("plain-d6-s0", "preln-d2-s0"):
        for suffix in (".json", ".parquet", ".loss.parquet"):
            (out / "runs" / f"{run_id}{suffix}").unlink()
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    result = runner.invoke(app, ["depth-sweep", *TINY, "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "runs.csv")) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # not rerun
    other = runner.invoke(
        app,
        [
            "depth-sweep",
            *TINY[:-4],
            "--workers",
            "1",
            "--dataset",
            "synthetic",
            "--width",
            "16",
            "--resume",
            str(out),
        ],
    )
    assert other.exit_code == 2 and "another configuration" in other.output


def test_interrupted_sweep_keeps_finished_runs(tmp_path, monkeypatch):
    from gradscope.lab.sweep import executor as sweep

    calls = {"n": 0}
    real = sweep._work

    def flaky(spec, config, out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(spec, config, out)

    monkeypatch.setattr(sweep, "_work", flaky)
    out = tmp_path / "sweep"
    result = _sweep(out)
    assert result.exit_code == 130
    assert len(pd.read_csv(out / "runs.csv")) == 2 and (out / "report.html").is_file()
    monkeypatch.setattr(sweep, "_work", real)
    assert runner.invoke(app, ["depth-sweep", *TINY, "--resume", str(out)]).exit_code == 0
    assert len(pd.read_csv(out / "runs.csv")) == 4


def test_a_ctrl_c_that_library_code_swallows_still_stops_the_sweep(tmp_path, monkeypatch):
    import os
    import signal

    from gradscope.lab.sweep import executor as sweep

    calls = {"n": 0}
    real = sweep._work

    def swallowing(spec, config, out):
        calls["n"] += 1
        result = real(spec, config, out)
        if calls["n"] == 2:
            try:  # Ctrl-C arrives inside library code with a bare except
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))  # (the handler runs at the next bytecodes)
            except BaseException:
                pass
        return result

    monkeypatch.setattr(sweep, "_work", swallowing)
    # Ctrl-C taken as an interactive program takes it (a test run started as a background
    # job ignores it)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "sweep"
    try:
        result = _sweep(out)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == 130, result.output
    assert calls["n"] == 2 and len(pd.read_csv(out / "runs.csv")) == 2


def test_a_sweep_started_ignoring_ctrl_c_keeps_ignoring_it():
    """`nohup` or a script's `cmd &` start a process ignoring Ctrl-C: the sweep keeps that,
    and takes SIGTERM as a stop; both are as they were afterwards."""
    import signal

    from gradscope.lab.sweep.signals import stop_on_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (term, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max", "1"], "--min (2) is above --max (1)"),
        (["--max", "0"], "must be >= 1"),
        (["--min", "50", "--max", "10"], "--min (50) is above --max (10)"),
        (["--variants", "plain,densenet"], "unknown variant 'densenet'"),
        (["--depths", "2,x"], "comma-separated integers"),
        (["--optimizer", "lion"], "'lion' is not one of"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_sweep_bad_input(tmp_path, args, message):
    out = tmp_path / "never"
    result = runner.invoke(app, ["depth-sweep", "--dataset", "synthetic", "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_sweep_non_integer_and_unwritable_out(tmp_path):
    result = runner.invoke(app, ["depth-sweep", "--max", "ten"])
    assert result.exit_code == 2 and "Invalid value for '--max'" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _sweep(blocker / "sub")
    assert result.exit_code == 2 and "cannot write" in result.output


def test_sweep_missing_data_is_clear(tmp_path):
    result = runner.invoke(
        app,
        [
            "depth-sweep",
            "--depths",
            "2",
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "GRADSCOPE_DATA" in result.output
    assert not (tmp_path / "o").exists()


def test_train_cli_records_a_run_folder_and_rejects_bad_input(tmp_path):
    out = tmp_path / "run"
    args = ["--model", "preln", "--depth", "2", "--dataset", "synthetic", "--steps", "12"]
    result = runner.invoke(app, ["train", *args, "--every", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and str(out) in result.output
    run = load_run(out)
    assert sorted(run.frame["step"].unique()) == [0, 3, 6, 9]
    assert (run.frame["stat"] == "loss").any() and (out / "report.html").is_file()
    for args, message in (
        (["--model", "vgg"], "unknown model"),
        (["--model", "plain", "--depth", "0"], "depth"),
        (["--activation", "swish", "--model", "plain"], "'swish' is not one of"),
        (["--optimizer", "lion"], "'lion' is not one of"),
        (["--every", "0"], "--every"),
        (["--data-root", str(tmp_path)], "GRADSCOPE_DATA"),
    ):
        bad = runner.invoke(app, ["train", *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


@pytest.mark.e2e
def test_deep_digit_default_train_reaches_97_percent(tmp_path, mnist_root):
    result = subprocess.run(
        [sys.executable, "-m", "gradscope", "train", "--data-root", str(mnist_root)]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 97.0, result.stdout


@pytest.mark.e2e
def test_real_mnist_sweep_shows_vanishing_in_plain_not_preln(tmp_path, mnist_root):
    out = tmp_path / "mnist"
    result = runner.invoke(
        app,
        [
            "depth-sweep",
            "--depths",
            "3,30",
            "--variants",
            "plain,preln",
            "--steps",
            "20",
            "--workers",
            "2",
            "--data-root",
            str(mnist_root),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "runs.csv").set_index(["variant", "depth"])
    assert runs.loc[("plain", 30), "grad_ratio_init"] < 1e-6
    assert runs.loc[("plain", 30), "grad_decay_init"] == pytest.approx(0.39, abs=0.05)
    assert runs.loc[("preln", 30), "grad_ratio_init"] > 0.1
    assert "vanishing_gradients" in runs.loc[("plain", 30), "verdicts_init"]
