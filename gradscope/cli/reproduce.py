"""gradscope reproduce: the teaching text's MNIST experiments against its numbers."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from gradscope.cli.common import DataRoot, app, fail, fetch_data, int_list
from gradscope.lab.choices import DatasetName

reproduce_app = typer.Typer(
    help="Rerun the teaching text's MNIST experiments and check its numbers.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(reproduce_app, name="reproduce")


def _shared(
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    quick: Annotated[
        bool, typer.Option(help="A short version for tests and demos (fewer epochs/steps).")
    ] = False,
    dataset: Annotated[DatasetName, typer.Option()] = DatasetName.MNIST,
    data_root: DataRoot = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder; default reports/reproduce-<name>-<time>/.")
    ] = None,
) -> None:
    """The options every `gradscope reproduce` command takes, declared once: a new one goes
    here and into _reproduce's parameters."""


def _command(name: str, **fixed: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Registers `gradscope reproduce <name>` from a function that declares only the
    experiment's own options (its docstring is the help): the command takes them and the
    shared ones (_shared), and runs gradscope.lab.reproduce.<name> with them and `fixed`."""

    def register(own: Callable[..., None]) -> Callable[..., None]:
        shared = list(inspect.signature(_shared, eval_str=True).parameters.values())
        params = [*inspect.signature(own, eval_str=True).parameters.values(), *shared]

        def command(**options: Any) -> None:
            common = {p.name: options.pop(p.name) for p in shared}
            _reproduce(name, **common, **fixed, **options)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = own.__doc__
        reproduce_app.command(name)(command)
        return own

    return register


def _reproduce(
    name: str,
    seeds: str,
    quick: bool,
    dataset: DatasetName,
    data_root: str | None,
    out: Path | None,
    **settings: Any,
) -> None:
    """Runs gradscope.lab.reproduce.<name>(data, seeds, **settings), saves, reports, prints."""
    import pandas as pd

    from gradscope.lab import reproduce as rp
    from gradscope.lab.data import DataError, load_dataset
    from gradscope.report.reproduce import render_reproduction

    seed_list = int_list(seeds, "--seeds")
    target = out or Path("reports") / f"reproduce-{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    fetch_data(dataset.value, data_root)
    try:
        data = load_dataset(dataset.value, data_root)
        if target.exists() and any(target.iterdir()):
            fail(f"{target} exists and is not empty; choose a new --out")
        target.mkdir(parents=True, exist_ok=True)
    except DataError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write to {target}: {e.strerror or e}")
    count = {"n": 0}

    def progress(what: str) -> None:
        count["n"] += 1
        typer.echo(f"[{count['n']}] training {what}", err=True)

    try:
        if quick:
            settings = rp.quick_settings(name, settings)
        result = getattr(rp, name)(data, seed_list, progress=progress, **settings)
    except ValueError as e:
        fail(str(e))
    rp.save(result, target)
    report = render_reproduction(result, target)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        typer.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    typer.echo(f"\nreport: {report}")


@_command("journey", train_size=None)
def _journey(
    epochs: Annotated[int, typer.Option()] = 5,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr_sgd: Annotated[float, typer.Option(help="Learning rate of the SGD row.")] = 0.01,
    lr_adam: Annotated[float, typer.Option(help="Learning rate of the Adam/AdamW rows.")] = 1e-3,
) -> None:
    """digit with SGD, Adam, AdamW, AdamW + cosine, and deep-digit: against 93.6 ... 98.1%."""


@_command("dropout", also_epochs=(50, 100))
def _dropout(
    epochs: Annotated[int, typer.Option()] = 20,
    train_size: Annotated[int, typer.Option()] = 1000,
) -> None:
    """1,000 training examples with and without dropout 0.2: train/test accuracy and the gap.

    The comparison is repeated at 50 and 100 epochs (not with --quick): the effect fades
    with longer training.
    """


@_command("regularization", train_size=None)
def _regularization(
    epochs: Annotated[int, typer.Option()] = 5,
    l1: Annotated[float, typer.Option(help="L1 penalty strength (in the loss).")] = 1e-4,
    l1_proximal: Annotated[
        float, typer.Option(help="L1 proximal strength (threshold lr * this).")
    ] = 0.1,
) -> None:
    """L2 (AdamW weight decay) against L1 (penalty and proximal): weight norms and zeros."""


@_command("clipping")
def _clipping(
    depth: Annotated[int, typer.Option(help="Residual blocks (no normalization).")] = 50,
    steps: Annotated[int, typer.Option()] = 300,
    lr: Annotated[float, typer.Option()] = 0.05,
    clip: Annotated[float, typer.Option()] = 1.0,
) -> None:
    """A residual stack with exploding gradients, trained with and without clipping at 1.0."""
