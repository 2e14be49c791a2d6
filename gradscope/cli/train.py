"""gradscope train: one recorded training run of a zoo or teaching-text model, saved as a run
folder (frame.parquet, run.json, report.html) that `gradscope report` and `diff` read."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from gradscope.cli.common import DataRoot, app, fail, fetch_data
from gradscope.lab.choices import Activation, DatasetName, Init, OptimizerName, Schedule


@app.command()
def train(
    model: Annotated[
        str, typer.Option(help="digit, digit-dropout, deep-digit or a zoo variant.")
    ] = "deep-digit",
    depth: Annotated[int, typer.Option(help="Blocks (zoo variants only).")] = 8,
    width: Annotated[int, typer.Option(help="Hidden width (zoo variants only).")] = 128,
    activation: Annotated[Activation, typer.Option(help="Zoo variants only.")] = Activation.RELU,
    init: Annotated[Init, typer.Option(help="Zoo variants only.")] = Init.DEFAULT,
    dropout: Annotated[float, typer.Option(help="Dropout (zoo variants only).")] = 0.0,
    optimizer: Annotated[
        OptimizerName, typer.Option(help="sgd has momentum 0.9.")
    ] = OptimizerName.ADAMW,
    lr: Annotated[float | None, typer.Option(help="Default: sgd 0.05, adam/adamw 1e-3.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 0.01 for adamw.")] = None,
    l1: Annotated[float, typer.Option(help="L1 penalty on weight matrices.")] = 0.0,
    schedule: Annotated[Schedule, typer.Option()] = Schedule.COSINE,
    clip: Annotated[float | None, typer.Option(help="Clip the total gradient norm.")] = None,
    epochs: Annotated[int, typer.Option()] = 5,
    steps: Annotated[int | None, typer.Option(help="Overrides --epochs.")] = None,
    batch_size: Annotated[int, typer.Option()] = 128,
    train_size: Annotated[int | None, typer.Option(help="Train on this many examples.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dataset: Annotated[DatasetName, typer.Option()] = DatasetName.MNIST,
    every: Annotated[int, typer.Option(help="Record every N-th step.", min=1)] = 10,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder to write; default reports/train-<model>-<timestamp>/."),
    ] = None,
    data_root: DataRoot = None,
) -> None:
    """Train one configuration with gradscope watching it; print its accuracy and verdicts,
    and save the run folder with its report.

    Example: gradscope train --model deep-digit --optimizer adamw --schedule cosine --epochs 5
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from gradscope.lab.data import DataError, load_dataset
    from gradscope.lab.models import build_named
    from gradscope.lab.train import TrainConfig, total_steps
    from gradscope.lab.train import train as run_training
    from gradscope.recorder import Recorder

    config = TrainConfig(
        optimizer=optimizer.value,
        lr=lr,
        weight_decay=weight_decay,
        l1=l1,
        schedule=schedule.value,
        clip=clip,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        train_size=train_size,
        seed=seed,
    )
    try:
        config.validate()
        torch.manual_seed(seed)
        net = build_named(model, depth, width, activation.value, init.value, dropout)
        fetch_data(dataset.value, data_root)
        data = load_dataset(dataset.value, data_root)
    except (ValueError, DataError) as e:
        fail(str(e))
    target = out or Path("reports") / f"train-{model}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    n = total_steps(config, min(len(data.y_train), train_size or len(data.y_train)))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    recorder = Recorder(every=every)
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"training {model}", total=n, loss=float("nan"))
        result = run_training(
            net,
            data,
            config,
            recorder=recorder,
            progress=lambda s, t, loss: bar.update(task, completed=s, loss=loss),
        )
    typer.echo(
        f"{model} on {dataset.value}: test accuracy {result.test_acc:.2%}, train accuracy "
        f"{result.train_acc:.2%}, {result.steps} steps in {result.seconds:.1f}s"
        + (" (diverged: the loss became non-finite)" if result.diverged else "")
    )
    try:
        folder = recorder.save(target, name=target.name)
    except OSError as e:
        fail(f"cannot write the run folder {target}: {e.strerror or e}")
    run_verdicts = [v for v in recorder.diagnose() if v.severity in ("warning", "error")]
    for verdict in run_verdicts:
        typer.echo(f"[{verdict.severity}] {verdict.id}: {verdict.message}")
    typer.echo(f"run folder: {folder} (report: {Path(folder) / 'report.html'})")
