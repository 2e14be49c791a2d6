"""gradscope train: one instrumented training run of a zoo or teaching-text model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from gradscope.cli.common import DataRoot, app, fail, fetch_data

if TYPE_CHECKING:
    pass


@app.command()
def train(
    model: Annotated[
        str, typer.Option(help="digit, digit-dropout, deep-digit or a zoo variant.")
    ] = "deep-digit",
    depth: Annotated[int, typer.Option(help="Blocks (zoo variants only).")] = 8,
    width: Annotated[int, typer.Option(help="Hidden width (zoo variants only).")] = 128,
    activation: Annotated[str, typer.Option(help="relu, tanh, sigmoid, gelu.")] = "relu",
    init: Annotated[str, typer.Option(help="default, kaiming, xavier, orthogonal.")] = "default",
    dropout: Annotated[float, typer.Option(help="Dropout (zoo variants only).")] = 0.0,
    optimizer: Annotated[str, typer.Option(help="sgd (momentum 0.9), adam, adamw.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Default: sgd 0.05, adam/adamw 1e-3.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 0.01 for adamw.")] = None,
    l1: Annotated[float, typer.Option(help="L1 penalty on weight matrices.")] = 0.0,
    schedule: Annotated[str, typer.Option(help="constant or cosine.")] = "cosine",
    clip: Annotated[float | None, typer.Option(help="Clip the total gradient norm.")] = None,
    epochs: Annotated[int, typer.Option()] = 5,
    steps: Annotated[int | None, typer.Option(help="Overrides --epochs.")] = None,
    batch_size: Annotated[int, typer.Option()] = 128,
    train_size: Annotated[int | None, typer.Option(help="Train on this many examples.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, synthetic.")] = "mnist",
    data_root: DataRoot = None,
) -> None:
    """Train one configuration and print its accuracy.

    Example: gradscope train --model deep-digit --optimizer adamw --schedule cosine --epochs 5
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from gradscope.lab.data import DataError, load_dataset
    from gradscope.lab.models import build_named
    from gradscope.lab.train import TrainConfig, total_steps
    from gradscope.lab.train import train as run_training

    config = TrainConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        l1=l1,
        schedule=schedule,
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
        net = build_named(model, depth, width, activation, init, dropout)
        fetch_data(dataset, data_root)
        data = load_dataset(dataset, data_root)
    except (ValueError, DataError) as e:
        fail(str(e))
    n = total_steps(config, min(len(data.y_train), train_size or len(data.y_train)))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"training {model}", total=n, loss=float("nan"))
        result = run_training(
            net, data, config, progress=lambda s, t, loss: bar.update(task, completed=s, loss=loss)
        )
    typer.echo(
        f"{model} on {dataset}: test accuracy {result.test_acc:.2%}, train accuracy "
        f"{result.train_acc:.2%}, {result.steps} steps in {result.seconds:.1f}s"
        + (" (diverged: the loss became non-finite)" if result.diverged else "")
    )
