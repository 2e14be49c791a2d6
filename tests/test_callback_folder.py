"""The run folder the trainer callbacks keep current while training: read from inside a later
training step (Lightning, the transformers Trainer), at the end, and after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gradscope.runs import RunError, load_run

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path, callbacks, steps):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 20), torch.randint(0, 4, (256,)))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    trainer.fit(_Net(), torch.utils.data.DataLoader(data, batch_size=8))


class _ReadAt(pl.Callback):
    """Reads the run folder (and renders its report, as `gradscope report` does) after the
    batch `at`, while training goes on."""

    def __init__(self, folder: Path, at: int) -> None:
        self.folder, self.at, self.seen = folder, at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            from gradscope.cli import app

            try:
                run = load_run(self.folder)
            except RunError as e:
                self.seen = e
                return
            result = CliRunner().invoke(app, ["report", str(self.folder)])
            self.seen = (sorted(run.frame.step.unique()), run.info, result)


def test_lightning_callback_keeps_the_folder_readable_while_training(tmp_path):
    from gradscope.integrations.lightning import GradscopeCallback

    out = tmp_path / "run"
    (out).mkdir()
    (out / "run.json").write_text("{}")  # an earlier run's: this run replaces it at once
    (out / "notes.txt").write_text("mine")
    probe = _ReadAt(out, at=25)
    _fit(tmp_path, [GradscopeCallback(out, every=1, save_every=10), probe], steps=32)
    steps, info, result = probe.seen
    # after recorded step 25: the parts of steps 0-9 and 10-19 (a part every 10 recorded steps)
    assert steps == list(range(20))
    assert info["spill"]["parts"] == 2 and info["model"]["class"] == "Sequential"
    assert info["model"]["optimizer"] == "SGD"  # found in fit(), after attach
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    run = load_run(out)  # at the end: the whole run, saved
    assert sorted(run.frame.step.unique()) == list(range(32)) and "spill" not in run.info
    assert (out / "report.html").is_file() and (out / "notes.txt").read_text() == "mine"


def test_save_every_none_writes_only_at_the_end(tmp_path):
    from gradscope.integrations.lightning import GradscopeCallback

    out = tmp_path / "run"
    probe = _ReadAt(out, at=5)
    _fit(tmp_path, [GradscopeCallback(out, save_every=None), probe], steps=8)
    assert isinstance(probe.seen, RunError) and "not a folder" in str(probe.seen)
    assert sorted(load_run(out).frame.step.unique()) == list(range(8))
    with pytest.raises(ValueError, match="save_every"):
        GradscopeCallback(out, save_every=0)


class _HFReadAt(transformers.TrainerCallback):
    def __init__(self, folder: Path, at: int) -> None:
        self.folder, self.at, self.seen = folder, at, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.seen = sorted(load_run(self.folder).frame.step.unique())


def test_hf_callback_keeps_the_folder_readable_while_training(tmp_path):
    from gradscope.integrations.transformers import GradscopeTrainerCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (32, 8))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=8,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    out = tmp_path / "run"
    probe = _HFReadAt(out, at=6)  # global_step 6: recorded steps 0-5 done
    callbacks = [GradscopeTrainerCallback(out, every=1, save_every=2), probe]
    data = [{"input_ids": row, "labels": row} for row in ids]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    assert probe.seen == list(range(6))
    assert sorted(load_run(out).frame.step.unique()) == list(range(8))


CHILD = """
import os, signal, sys, torch
from torch import nn
import lightning.pytorch as pl
from gradscope.integrations.lightning import GradscopeCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

class Die(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 35:
            os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(512, 20), torch.randint(0, 4, (512,)))
trainer = pl.Trainer(max_steps=60, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=sys.argv[2],
                     callbacks=[GradscopeCallback(sys.argv[1], save_every=10), Die()])
trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
"""


def test_a_killed_fit_leaves_a_folder_load_run_reads(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = textwrap.dedent(CHILD)
    child = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    run = load_run(out)
    assert sorted(run.frame.step.unique()) == list(range(30))  # the parts before the kill
    assert not (out / "run.json").exists() and run.info["model"]["class"] == "Sequential"
    assert {"param_grad", "activation"} <= set(run.frame.kind)
    from gradscope.report.run import render_run_report

    page = render_run_report(run).read_text()  # says what it is: not a finished run
    assert "The rows written so far (3 parts): the run is still training" in page
    assert "None" not in page.partition("<h2>")[0]
