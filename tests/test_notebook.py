"""The example notebook runs in a real Jupyter kernel (nbclient + ipykernel): no errors, its
figures and the live panel present, the panel redrawn while training; its HTML export opens
in headless Chromium. Also the `_repr_html_` summaries and the terminal live view."""

import io
import os
import re
import sys

import pytest
import torch
from conftest import REPO, screenshot
from torch import nn

import gradscope as gs
from gradscope.integrations.live import LiveView

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "examples" / "two_classifiers.ipynb"


@pytest.fixture(scope="module")
def executed(mnist_root, tmp_path_factory):
    """The notebook run top to bottom in a kernel started from this interpreter (the venv
    under test): a kernel spec written for the test, whatever the machine has installed."""
    import json

    specs = tmp_path_factory.mktemp("jupyter")
    spec = specs / "kernels" / "gradscope-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "gradscope test", "language": "python"})
    )
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH", "GRADSCOPE_DATA")}
    os.environ["JUPYTER_PATH"] = str(specs)
    # the kernel imports this checkout's gradscope and reads MNIST from the test's root
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), saved["PYTHONPATH"] or ""])
    os.environ["GRADSCOPE_DATA"] = str(mnist_root)
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=600,
            kernel_name="gradscope-test",
            resources={"metadata": {"path": str(REPO)}},
        )
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_the_example_notebook_runs_in_a_kernel(executed):
    outputs = _outputs(executed)
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # profiles, heatmaps, timeline
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    panels = [h for h in html if 'aria-label="gradscope live panel"' in h]
    assert len(panels) == 2  # one panel per training cell, redrawn in place
    summaries = [h for h in html if "gradscope Recorder" in h]
    assert len(summaries) == 2 and all("data:image/png;base64," in h for h in summaries)
    assert any("vanishing_gradients" in h for h in html)  # the deep stack's verdict list
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    redraws = [int(n) for n in re.findall(r"live panel redrawn (\d+) times", text)]
    assert len(redraws) == 2 and min(redraws) >= 2  # updated while training, then final
    # the final state stays: the panel shows the last recorded step of the 60 (58)
    assert all("gradscope step 58:" in p for p in panels)


def test_the_notebooks_html_export_opens_in_chromium(executed, chromium, tmp_path):
    from nbconvert import HTMLExporter

    page = tmp_path / "two_classifiers.html"
    body, _ = HTMLExporter().from_notebook_node(executed)
    page.write_text(body)
    screenshot(chromium, page, tmp_path / "notebook.png", "1200,3000", 20_000, keep_page=True)


def _record(live=False, steps=6):
    torch.manual_seed(0)
    model = gs.build_model("plain", 4, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    with gs.watch(model, every=2, live=live) as rec:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return rec


def test_the_terminal_live_view_prints_a_line_per_interval():
    out = io.StringIO()
    view = LiveView(interval=0.0, notebook=False, write=out.write)
    rec = _record(live=view)
    lines = out.getvalue().splitlines()
    # each recorded step (0, 2, 4) once, and the final state again at detach
    assert [ln.split(":")[0] for ln in lines] == ["gradscope step " + s for s in "0244"]
    frame = rec.to_frame()
    total = frame[(frame.layer == "*") & (frame.kind == "param_grad") & (frame.step == 4)]
    assert f"grad norm {float(total.value.iloc[0]):.3g}" in lines[-1]
    assert "loss " in lines[-1] and "worst " in lines[-1]
    # at a long interval it shows the first recorded step, then only the final state
    out2 = io.StringIO()
    _record(live=LiveView(interval=3600, notebook=False, write=out2.write))
    assert [ln.split(":")[0] for ln in out2.getvalue().splitlines()] == [
        "gradscope step 0",
        "gradscope step 4",
    ]


def test_repr_html_of_a_recorder_a_run_and_verdicts(tmp_path):
    rec = _record()
    page = rec._repr_html_()
    assert "gradscope Recorder (ZooModel, detached)" in page and "data:image/png" in page
    assert "recorded steps" in page and "3 (0 to 4)" in page
    run = gs.load_run(rec.save(tmp_path / "r"))
    assert "gradscope run r" in run._repr_html_()
    lines = run.verdicts._repr_html_()
    assert lines.count("<li") == len(run.verdicts) and run.verdicts[0].id in lines
