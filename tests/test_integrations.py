"""Trainers that build their own optimizer: Lightning and the transformers Trainer, with
nothing but gs.watch(model) around them, and gradscope's callbacks for each."""

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.runs import load_run

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")


def _grad_norms(frame):
    rows = frame[(frame.kind == "param_grad") & (frame.stat == "norm") & (frame.layer != "*")]
    return {(int(r.step), r.layer): r.value for r in rows.itertuples()}


class _Digits(pl.LightningModule):
    """A small classifier; keeps the float64 gradient norms each optimizer step will use."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        self.seen: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.seen.append({n: float(p.grad.double().norm()) for n, p in self.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _trainer(tmp_path, steps=6, **kwargs):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 20), torch.randint(0, 4, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        **kwargs,
    )
    return trainer, loader


def test_lightning_fit_is_recorded_with_nothing_but_watch(tmp_path):
    trainer, loader = _trainer(tmp_path, logger=False)
    module = _Digits()
    with gs.watch(module) as rec:
        trainer.fit(module, loader)
    frame = rec.to_frame()
    got = _grad_norms(frame)
    assert sorted(frame.step.unique()) == list(range(6)) and len(module.seen) == 6
    for step, ref in enumerate(module.seen):
        for name, value in ref.items():
            assert got[(step, name)] == pytest.approx(value, rel=1e-6), (step, name)
    assert {"activation", "activation_grad", "update"} <= set(frame.kind)


def test_lightning_callback_logs_headlines_and_saves_the_run(tmp_path):
    from gradscope.integrations.lightning import GradscopeCallback

    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs")
    callback = GradscopeCallback(tmp_path / "run", every=2)
    trainer, loader = _trainer(tmp_path, logger=logger, callbacks=[callback])
    module = _LossKeeping()
    trainer.fit(module, loader)
    metrics = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    logged = metrics.dropna(subset=["gradscope/grad_norm"])
    assert logged["step"].tolist() == [0, 2, 4]  # logged at the step recorded, not the next
    run = load_run(tmp_path / "run")
    total = run.frame[(run.frame.layer == "*") & (run.frame.kind == "param_grad")]
    assert logged["gradscope/grad_norm"].tolist() == pytest.approx(total.value.tolist())
    assert set(logged["gradscope/worst_severity"]) <= {0.0, 1.0, 2.0, 3.0}
    # the loss of each recorded step, as training_step returned it
    loss = run.frame[(run.frame.kind == "scalar") & (run.frame.stat == "loss")]
    assert loss.step.tolist() == [0, 2, 4]
    assert loss.value.tolist() == pytest.approx([module.losses[s] for s in (0, 2, 4)])
    assert logged["gradscope/loss"].tolist() == pytest.approx(loss.value.tolist())
    # the wrapped network's own names: the same as in a plain loop
    grads = run.frame[run.frame.kind == "param_grad"]
    assert set(grads.layer) == {"*", "0.weight", "0.bias", "2.weight", "2.bias"}
    page = (tmp_path / "run" / "report.html").read_text()
    assert "loss does not decrease' was not checked" not in page


class _LossKeeping(_Digits):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def test_diff_of_a_plain_loop_and_lightning_aligns_names(tmp_path):
    """The same network trained in a plain loop and under Lightning: diff matches every
    layer (the LightningModule's attribute name is not part of the names)."""
    from typer.testing import CliRunner

    from gradscope.cli import app
    from gradscope.integrations.lightning import GradscopeCallback

    callback = GradscopeCallback(tmp_path / "lit", every=1, unwrap=False)  # model.* names
    trainer, loader = _trainer(tmp_path, logger=False, callbacks=[callback])
    trainer.fit(_Digits(), loader)
    torch.manual_seed(0)
    net = _Digits().net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with gs.watch(net) as rec:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            if rec.step_index >= 6:
                break
    plain = rec.save(tmp_path / "plain")
    result = CliRunner().invoke(app, ["diff", str(plain), str(tmp_path / "lit")])
    assert result.exit_code in (0, 1), result.output
    assert "aligned: 'net.' stripped from B's layer names" in result.output
    assert "without a match" in result.output and ", 0 without a match" in result.output


class _Reference(transformers.TrainerCallback):
    """The float64 gradient norms the optimizer is about to use (after clipping)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append(
            {n: float(p.grad.double().norm()) for n, p in model.named_parameters()
             if p.grad is not None}
        )  # fmt: skip


def _hf_trainer(tmp_path, callbacks):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=64, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(config)  # from a config: nothing downloaded
    ids = torch.randint(0, 64, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    return model, trainer


def test_hf_trainer_is_recorded_with_nothing_but_watch(tmp_path):
    reference = _Reference()
    model, trainer = _hf_trainer(tmp_path, [reference])
    with gs.watch(model) as rec:
        trainer.train()
    frame = rec.to_frame()
    assert sorted(frame.step.unique()) == [0, 1, 2, 3] and len(reference.seen) == 4
    got = _grad_norms(frame)
    for step, ref in enumerate(reference.seen):
        for name, value in ref.items():
            assert got[(step, name)] == pytest.approx(value, rel=1e-6), (step, name)
    blocks = frame[(frame.kind == "activation") & (frame.stat == "block_index")]
    assert {layer.partition("[")[0] for layer in blocks.layer} == {
        "transformer.h.0",
        "transformer.h.1",
    }


def test_hf_callback_logs_headlines_and_saves_the_run(tmp_path):
    from gradscope.integrations.transformers import GradscopeTrainerCallback

    callback = GradscopeTrainerCallback(tmp_path / "run", every=1)
    _, trainer = _hf_trainer(tmp_path, [callback])
    trainer.train()
    history = [h for h in trainer.state.log_history if "gradscope/grad_norm" in h]
    assert len(history) >= 4
    run = load_run(tmp_path / "run")
    total = run.frame[(run.frame.layer == "*") & (run.frame.kind == "param_grad")]
    by_step = {h["step"]: h["gradscope/grad_norm"] for h in history if "loss" not in h}
    assert list(by_step) == total.step.tolist() == [0, 1, 2, 3]  # the recorder's steps
    assert list(by_step.values()) == pytest.approx(total.value.tolist())
    assert run.info["model"]["class"] == "GPT2LMHeadModel"


class _Tiny(nn.Module):
    """A model that returns its loss as a mean over its batch (no num_items_in_batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


class _Reported(transformers.TrainerCallback):
    """What a reporter after gradscope's callback receives in on_log."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


@pytest.mark.parametrize("model_kind", ["gpt2", "mean-loss"])
def test_hf_callback_steps_with_gradient_accumulation(tmp_path, model_kind):
    """gradient_accumulation_steps=2: one recorded step per optimizer step (global_step), the
    loss the Trainer logs for update k+1 on the recorder's step k, the gradient norms the
    update used, and the headlines on the recorder's step axis."""
    from gradscope.integrations.transformers import STEP_KEY, GradscopeTrainerCallback

    torch.manual_seed(0)
    if model_kind == "gpt2":  # the Trainer passes num_items_in_batch: the loss is summed
        config = transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32, use_cache=False
        )
        model = transformers.GPT2LMHeadModel(config)
        data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (32, 8))]
    else:
        model = _Tiny()
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        data = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    reference, reported = _Reference(), _Reported()
    callback = GradscopeTrainerCallback(tmp_path / "run", every=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        max_grad_norm=1e9,  # no clipping: the Trainer's grad_norm is the one the update used
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    callbacks = [reference, callback, reported]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    assert trainer.state.global_step == 4 and len(reference.seen) == 4
    frame = load_run(tmp_path / "run").frame
    assert sorted(frame.step.unique()) == [0, 1, 2, 3]  # optimizer steps, not micro-batches
    got = _grad_norms(frame)
    for step, ref in enumerate(reference.seen):
        for name, value in ref.items():
            assert got[(step, name)] == pytest.approx(value, rel=1e-6), (step, name)
    # the Trainer logs update k+1's loss and grad_norm at global_step k+1
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    loss = frame[(frame.kind == "scalar") & (frame.stat == "loss")]
    assert loss.step.tolist() == [0, 1, 2, 3]
    assert loss.value.tolist() == pytest.approx([logged[k + 1]["loss"] for k in range(4)], rel=1e-5)
    total = frame[(frame.layer == "*") & (frame.kind == "param_grad") & (frame.stat == "norm")]
    trainer_norms = [logged[k + 1]["grad_norm"] for k in range(4)]
    assert total.value.tolist() == pytest.approx(trainer_norms, rel=1e-4)
    heads = {h["step"]: h for h in trainer.state.log_history if "gradscope/grad_norm" in h}
    assert sorted(heads) == [0, 1, 2, 3]
    assert [heads[k]["gradscope/loss"] for k in range(4)] == pytest.approx(loss.value.tolist())
    # a reporter after the callback gets each headline once, with the step it is of
    assert sum("gradscope/grad_norm" in logs for _, logs in reported.logs) == 4
    for global_step, logs in reported.logs:
        if "gradscope/grad_norm" in logs:
            assert logs[STEP_KEY] == global_step - 1
