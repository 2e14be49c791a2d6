"""The run report's "Tried" section: rendered from a real trial, opened in headless Chromium."""

from __future__ import annotations

import html

import torch
from conftest import rendered_page, screenshot
from torch import nn

import gradscope as gs
from gradscope.report.run import render_run_report
from gradscope.report.tried import tried_html, tried_text


def _trial_and_run(tmp_path):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(32, 20, generator=g), torch.randint(0, 4, (32,), generator=g))
        for _ in range(10)
    ]

    def make():  # type: ignore[no-untyped-def]
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        return model, torch.optim.SGD(model.parameters(), lr=8.0)

    def step(model, opt, batch):  # type: ignore[no-untyped-def]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return loss

    names = ["lr_x0.1", "clip_1.0", "warmup", "unfreeze", "reinit_matched"]
    trial = gs.try_remedies(make, step, data, steps=40, remedies=names)
    torch.manual_seed(0)
    model, opt = make()
    with gs.watch(model, optimizer=opt) as rec:
        for batch in data * 4:
            step(model, opt, batch)
    return trial, rec.save(tmp_path / "run")


def test_tried_section_renders_in_chromium(tmp_path, chromium):  # type: ignore[no-untyped-def]
    trial, folder = _trial_and_run(tmp_path)
    fragment = tried_html(trial)
    for run in trial.runs[1:]:
        assert run.name in fragment
        if run.remedy is not None:
            assert html.escape(run.remedy.code) in fragment
    assert "could not apply: no parameter has requires_grad=False" in fragment
    assert tried_text(trial).startswith("Best: ") == (trial.best is not None)
    page = render_run_report(gs.load_run(folder), trial=trial)
    dom = rendered_page(chromium, page, tmp_path / "profile", min_images=2)
    tried, after = dom.index("<h2>Tried</h2>"), dom.index("Gradient norm over training")
    assert dom.index("What is wrong") < tried < after
    assert 'alt="loss curve of each remedy' in dom[tried:after]
    screenshot(chromium, page, tmp_path / "tried.png", "1400,2000")
