"""Your own run: zero-config attachment, the run folder, its report, the diff, bad input."""

import json
import warnings

import pandas as pd
import pytest
import torch
from conftest import TINY_SWEEP as TINY
from conftest import rendered_page
from torch import nn
from typer.testing import CliRunner

import gradscope as gs
from gradscope.cli import app
from gradscope.diff import MEASURES
from gradscope.files import file_digest
from gradscope.lab.models import build_model
from gradscope.runs import RunError, load_run, save_run

runner = CliRunner()


def _norms(frame, step):
    rows = frame[(frame.kind == "param_grad") & (frame.stat == "norm") & (frame.step == step)]
    return rows.set_index("layer")["value"]


def _plain_loop(model, opt, steps, x, y, grads=None, rec=None):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if rec is not None:
            rec.log_scalar("loss", loss)
        loss.backward()
        if grads is not None:
            grads.append({n: float(p.grad.double().norm()) for n, p in model.named_parameters()})
        opt.step()


def test_watch_without_optimizer_finds_the_one_stepping_the_model():
    torch.manual_seed(0)
    model = build_model("preln", 2, width=16)
    other = nn.Linear(3, 3)  # an optimizer over another model: not ours, ignored
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    grads: list[dict[str, float]] = []
    with gs.watch(model) as rec:  # the optimizer is made after attaching, as trainers do
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
        for _ in range(3):
            other(torch.randn(2, 3)).sum().backward()
            other_opt.step()
            _plain_loop(model, opt, 1, x, y, grads)
    frame = rec.to_frame()
    assert sorted(frame.step.unique()) == [0, 1, 2]
    assert "update" in set(frame.kind)  # the found optimizer's updates are measured
    assert not any(layer.startswith("weight") for layer in frame.layer)
    for step, ref in enumerate(grads):
        got = _norms(frame, step)
        for name, value in ref.items():
            assert got[name] == pytest.approx(value, rel=1e-6), (step, name)
    assert rec.settings()["optimizer"] == "AdamW"
    with pytest.raises(gs.RecorderError, match="optimizer is attached"):
        _step_after_found(model, opt)


def _step_after_found(model, opt):
    rec = gs.watch(model, optimizer=opt)
    try:
        rec.step()  # the optimizer given closes the steps: a manual step is a mistake
    finally:
        rec.detach()


def test_a_loop_that_calls_rec_step_keeps_its_own_clock():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    grads = []
    with gs.watch(model) as rec, warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: rec.step() comes first
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            grads.append(float(model.weight.grad.double().norm()))
            rec.step()
            opt.step()
    frame = rec.to_frame()
    assert [_norms(frame, s)["weight"] for s in range(3)] == pytest.approx(grads, rel=1e-6)
    assert "update" not in set(frame.kind)  # no optimizer followed
    # the other order: the optimizer is found first, then rec.step() takes over, warned
    with gs.watch(model) as rec, pytest.warns(RuntimeWarning, match="no longer followed"):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
            rec.step()
    assert rec.optimizer is None and len(rec.to_frame().step.unique()) >= 3


def test_a_second_optimizer_over_the_model_is_warned_about_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with gs.watch(model) as rec, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(5, 4)).sum().backward()
            body.step()
            head.step()
    mine = [w for w in caught if "second optimizer" in str(w.message)]
    assert len(mine) == 1 and "watch each network" in str(mine[0].message)
    assert sorted(rec.to_frame().step.unique()) == [0, 1, 2]  # the first one closes steps


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no optimizer", "no optimizer stepped this model's parameters"),
        ("every skips", "recorded none of them"),
        ("no forward", "no forward pass with gradients"),
    ],
)
def test_a_recorder_that_recorded_nothing_says_why(case, reason):
    model = nn.Linear(3, 2)
    with pytest.warns(RuntimeWarning, match=reason):
        rec = gs.watch(model, every=(lambda s: s >= 100) if case == "every skips" else 1)
        if case == "every skips":
            for _ in range(3):
                model(torch.randn(2, 3)).sum().backward()
                rec.step()
        elif case == "no forward":
            with torch.no_grad():
                model(torch.randn(2, 3))
            rec.step()
        rec.detach()


def _record(tmp_path, name, variant="plain", depth=3, steps=12, report=False, **kwargs):
    """A recorded run and its folder; `report=True` saves as Recorder.save does, report
    included (a second or so of rendering), otherwise data only (gradscope.runs.save_run)."""
    torch.manual_seed(0)
    model = build_model(variant, depth, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    with gs.watch(model, every=3, **kwargs) as rec:
        _plain_loop(model, opt, steps, x, y, rec=rec)
    return rec, rec.save(tmp_path / name) if report else save_run(rec, tmp_path / name)


def test_run_folder_round_trips(tmp_path):
    rec, path = _record(tmp_path, "a", report=True)
    run = load_run(path)
    pd.testing.assert_frame_equal(run.frame, rec.to_frame())
    assert run.info["steps"] == {"recorded": 4, "first": 0, "last": 9}
    assert run.info["model"]["class"] == "ZooModel" and run.info["recorder"]["every"] == 3
    assert [v.id for v in run.verdicts] == [v.id for v in gs.diagnose(rec.to_frame())]
    assert (path / "report.html").is_file()
    # a spilled recording is copied part by part into frame.parquet
    spilled, spath = _record(tmp_path, "b", spill_to=tmp_path / "parts", spill_rows=50)
    assert len(spilled.spill_parts) >= 3
    pd.testing.assert_frame_equal(load_run(spath).frame, run.frame)


@pytest.mark.parametrize(("variant", "depth"), [("plain", 4), ("preln", 100)])
def test_run_report_renders_in_chromium(tmp_path, chromium, variant, depth):
    _, path = _record(tmp_path, "r", variant=variant, depth=depth, steps=7, report=True)
    dom = rendered_page(chromium, path / "report.html", tmp_path / "profile", min_images=4)
    # "What is wrong" heads the verdicts only when one is a warning or an error
    wrong = any(v.severity in ("warning", "error") for v in load_run(path).verdicts)
    assert ("<h2>What is wrong</h2>" in dom) == wrong
    assert ("<h2>Verdicts: nothing wrong found</h2>" in dom) == (not wrong)
    assert "threshold None" not in dom


def test_diff_exit_codes(tmp_path):
    _, healthy = _record(tmp_path, "healthy", variant="preln", depth=6)
    _, same = _record(tmp_path, "same", variant="preln", depth=6)
    _, vanishing = _record(tmp_path, "vanishing", variant="plain", depth=12)
    result = runner.invoke(app, ["diff", str(healthy), str(same)])
    assert result.exit_code == 0, result.output
    assert "no statistic changed" in result.output
    # same layer names, but a plain stack: its gradients vanish toward the input
    result = runner.invoke(app, ["diff", str(healthy), str(vanishing)])
    assert result.exit_code == 1, result.output
    assert "appears in B: [warning] vanishing_gradients" in result.output
    result = runner.invoke(app, ["diff", str(vanishing), str(healthy)])
    assert result.exit_code == 0 and "gone in B" in result.output
    result = runner.invoke(app, ["diff", str(healthy), str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output


def test_diff_fails_when_a_verdict_both_have_gets_worse(tmp_path):
    _, shallow = _record(tmp_path, "shallow", variant="plain", depth=20)
    _, deep = _record(tmp_path, "deep", variant="plain", depth=40)
    a, b = load_run(shallow), load_run(deep)
    va = next(v for v in a.verdicts if v.id == "vanishing_gradients")
    vb = next(v for v in b.verdicts if v.id == "vanishing_gradients")
    key = MEASURES["vanishing_gradients"][0]  # the evidence number diff compares
    factor = float(va.evidence[key]) / float(vb.evidence[key])
    assert va.severity == vb.severity == "error"
    assert factor > 10  # the same verdict at the same severity, many decades worse
    result = runner.invoke(app, ["diff", str(shallow), str(deep)])
    assert result.exit_code == 1, result.output
    assert "worse in B: [" in result.output and "vanishing_gradients: " in result.output
    assert "more than 10x" in result.output
    # the 20 extra blocks' layers are named as having no match, not silently left out
    only_b = [ln for ln in result.output.splitlines() if ln.startswith("only in B")]
    extra = (set(b.frame.layer) - set(a.frame.layer)) - {"*"}
    assert len(only_b) == 1 and only_b[0].startswith(f"only in B ({len(extra)}): blocks.20")
    assert "only in A" not in result.output
    # a factor above the measured one lets it pass; better in B passes
    loose = runner.invoke(app, ["diff", str(shallow), str(deep), "--worse-factor",
                                f"{factor * 10:g}"])  # fmt: skip
    worse = [ln for ln in loose.output.splitlines() if ln.startswith("worse in B")]
    assert loose.exit_code in (0, 1) and not any("vanishing_gradients" in ln for ln in worse)
    assert runner.invoke(app, ["diff", str(deep), str(shallow)]).exit_code == 0


def test_diff_strips_a_given_prefix(tmp_path):
    _, a = _record(tmp_path, "a", variant="preln", depth=3)
    frame = pd.read_parquet(a / "frame.parquet")
    b = tmp_path / "b"
    b.mkdir()
    frame.assign(layer=frame.layer.where(frame.layer == "*", "wrapped." + frame.layer)).to_parquet(
        b / "frame.parquet"
    )
    info = json.loads((a / "run.json").read_text())  # run.json names the frame it belongs to
    info["frame"] = {"rows": len(frame), "sha256": file_digest(b / "frame.parquet")}
    (b / "run.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["diff", str(a), str(b), "--strip-prefix", "wrapped."])
    assert result.exit_code == 0, result.output
    assert ", 0 without a match" in result.output and "no statistic changed" in result.output
    auto = runner.invoke(app, ["diff", str(a), str(b)])
    assert "'wrapped.' stripped from B's layer names" in auto.output


def test_diff_of_unrelated_models_is_bad_input(tmp_path):
    _, a = _record(tmp_path, "a")
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 4))
    with gs.watch(other) as rec:
        for _ in range(10):
            other(torch.randn(2, 4)).sum().backward()
            rec.step()
    b = save_run(rec, tmp_path / "b")
    result = runner.invoke(app, ["diff", str(a), str(b)])
    assert result.exit_code == 2 and "no layer in common" in result.output


def test_damaged_run_files_give_one_line_errors(tmp_path):
    _, path = _record(tmp_path, "a")
    info = (path / "run.json").read_text()
    (path / "run.json").write_text(info[: len(info) // 2])  # truncated
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 2 and "run.json is damaged" in result.output
    assert "Traceback" not in result.output
    (path / "run.json").write_text(info)
    data = (path / "frame.parquet").read_bytes()
    (path / "frame.parquet").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 2 and "frame.parquet is not a readable Parquet" in result.output
    with pytest.raises(RunError, match="not a run folder"):
        load_run(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run folder" in result.output


def test_a_damaged_sweep_run_is_named_and_rerun_on_resume(tiny_sweep):
    out = tiny_sweep
    row = out / "runs" / "plain-d2-s0.json"
    row.write_text(row.read_text()[:20])
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "plain-d2-s0" in result.output and "damaged" in result.output
    result = runner.invoke(app, ["depth-sweep", *TINY, "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "plain-d2-s0.json is damaged" in result.output and "running it again" in result.output
    assert json.loads(row.read_text())["variant"] == "plain"  # redone, whole
    (out / "config.json").write_text("{not json")
    result = runner.invoke(app, ["depth-sweep", *TINY, "--resume", str(out)])
    assert result.exit_code == 2 and "config.json is damaged" in result.output


def test_tensorboard_export_writes_headlines_under_one_prefix(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradscope.integrations.tensorboard import export_tensorboard

    rec, _ = _record(tmp_path, "a", variant="plain", depth=8)
    frame = rec.to_frame()
    written = export_tensorboard(frame, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert written == 4 * len(tags) and all(t.startswith("gradscope/") for t in tags)
    assert set(tags) == {
        "gradscope/grad_norm",
        "gradscope/grad_ratio_first_last",
        "gradscope/grad_decay_per_layer",
        "gradscope/loss",  # the loop logs it (rec.log_scalar)
        "gradscope/worst_severity",
    }
    norms = [e.value for e in events.Scalars("gradscope/grad_norm")]
    total = frame[(frame.layer == "*") & (frame.kind == "param_grad")].value.tolist()
    assert norms == pytest.approx(total, rel=1e-6)  # stored as float32


@pytest.mark.parametrize("optimizer_given", [True, False])
def test_step_with_a_closure_reads_the_gradients_the_closure_made(optimizer_given):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    seen = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        seen.append(float(model.weight.grad.double().norm()))
        return loss

    with gs.watch(model, optimizer=opt if optimizer_given else None) as rec:
        for _ in range(3):
            opt.step(closure)  # the gradients are made inside step(), as Lightning does
    frame = rec.to_frame()
    assert [_norms(frame, s)["weight"] for s in range(3)] == pytest.approx(seen, rel=1e-6)


def test_verdicts_on_a_page_name_their_layers_and_keep_their_evidence():
    from gradscope.report.verdicts import heading, verdict_html

    frozen = gs.Verdict(
        "frozen_layers", "warning", "8 weight matrices barely move", "raise the lr",
        layers=[f"blocks.{i}.fc.weight" for i in range(8)],
        evidence={"share_of_steps": {f"blocks.{i}.fc.weight": 0.9 + i / 100 for i in range(8)},
                  "steps": [0, 5, 10]},
        threshold=0.8,
    )  # fmt: skip
    page = verdict_html(frozen)
    assert "blocks.0.fc.weight" in page and "and 3 more" in page  # layers named, 5 shown
    assert "share_of_steps = {blocks.0.fc.weight: 0.9," in page and "steps = [0, 5, 10]" in page
    assert "threshold" not in page  # the message states its own cut-off
    healthy = gs.Verdict("healthy", "ok", "gradients flow", "", threshold=None)
    assert "None" not in verdict_html(healthy)
    assert heading([healthy]) == "Verdicts: nothing wrong found"
    assert heading([healthy, frozen]) == "What is wrong"
