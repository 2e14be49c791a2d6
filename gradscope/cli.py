"""The gradscope command line: train, depth-sweep, report, reproduce. The only typer module."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from gradscope.lab.sweep import SweepConfig

app = typer.Typer(
    help="gradscope: see where gradients vanish or explode, and why.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain one-line usage errors
)

DataRoot = Annotated[
    str | None,
    typer.Option(
        "--data-root",
        envvar="GRADSCOPE_DATA",
        help="Folder holding MNIST/raw/ (and FashionMNIST/raw/); default: $GRADSCOPE_DATA, "
        "else ~/.cache/gradscope.",
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints a one-line error and exits."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _fetch_data(dataset: str, data_root: str | None) -> None:
    """Downloads what is missing of an IDX dataset, with a progress bar; found files are only
    checked. Exits 2 with the loader's one-line error where that cannot be done."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from gradscope.lab.data import DataError, ensure_files

    if dataset not in ("mnist", "fashion-mnist"):
        return  # synthetic, or unknown: the loader says so
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True
    ) as bar:
        tasks: dict[str, Any] = {}

        def show(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"downloading {name}", total=total)
            bar.update(tasks[name], completed=done)

        try:
            ensure_files(dataset, data_root, show)
        except DataError as e:
            fail(str(e))


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{what} is empty")
    return values


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
        _fetch_data(dataset, data_root)
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


@app.command("depth-sweep")
def depth_sweep(
    max_depth: Annotated[
        int,
        typer.Option(
            "--max",
            "--max-depth",
            help="Deepest depth (--max-depth under torchrun, whose own --max-restarts swallows --max).",
        ),
    ] = 100,
    min_depth: Annotated[int, typer.Option("--min", "--min-depth", help="Shallowest depth.")] = 2,
    depths: Annotated[str | None, typer.Option(help="Explicit depths, e.g. 2,8,32,100.")] = None,
    variants: Annotated[
        str,
        typer.Option(help="Comma-separated: plain, residual, preln, postln, rmsnorm, batchnorm."),
    ] = "plain,residual,preln,postln,rmsnorm",
    width: Annotated[int, typer.Option()] = 128,
    activation: Annotated[str, typer.Option(help="relu, tanh, sigmoid, gelu.")] = "relu",
    init: Annotated[str, typer.Option(help="default, kaiming, xavier, orthogonal.")] = "default",
    optimizer: Annotated[
        str,
        typer.Option(
            help="sgd (momentum 0.9) by default: Adam-like optimizers rescale small gradients and hide vanishing."
        ),
    ] = "sgd",
    lr: Annotated[float | None, typer.Option(help="Default: sgd 0.05, adam/adamw 1e-3.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps per run (overrides --epochs).")
    ] = 500,
    epochs: Annotated[int, typer.Option(help="Epochs per run, used when --steps is 0.")] = 1,
    batch_size: Annotated[int, typer.Option()] = 128,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, synthetic.")] = "mnist",
    data_root: DataRoot = None,
    every: Annotated[
        int, typer.Option(help="Record every N steps (and step 0, and the last).")
    ] = 20,
    out: Annotated[
        Path | None, typer.Option(help="Output folder; default reports/depth-sweep-<timestamp>/.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Go on with an interrupted sweep in this folder.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (runs go in parallel).")] = 2,
) -> None:
    """Train every variant across depths and show where gradients vanish or explode.

    Writes frame.parquet, runs.csv, report.html and config.json, each run saved as it finishes.
    """
    from gradscope.lab.sweep import SweepConfig, SweepError, default_depths

    if depths is not None:
        depth_list = sorted(set(_int_list(depths, "--depths")))
    else:
        if max_depth < 1 or min_depth < 1:
            fail(f"--min and --max must be >= 1, got --min {min_depth} --max {max_depth}")
        if min_depth > max_depth:
            fail(f"--min ({min_depth}) is above --max ({max_depth})")
        depth_list = default_depths(min_depth, max_depth)
    if workers < 1:
        fail(f"--workers must be >= 1, got {workers}")
    config = SweepConfig(
        depths=tuple(depth_list),
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        width=width,
        activation=activation,
        init=init,
        optimizer=optimizer,
        lr=lr,
        steps=steps or None,
        epochs=epochs,
        batch_size=batch_size,
        seeds=tuple(_int_list(seeds, "--seeds")),
        dataset=dataset,
        every=every,
    )
    if resume is not None and out is not None and out != resume:
        fail("give either --out or --resume, not both")
    target = resume or out or Path("reports") / f"depth-sweep-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        config.validate()
    except SweepError as e:
        fail(str(e))
    _run_sweep_cli(config, target, data_root, workers, resume is not None)


def _run_sweep_cli(
    config: SweepConfig, target: Path, data_root: str | None, workers: int, resume: bool
) -> None:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from gradscope.lab import sweep_run
    from gradscope.lab.data import DataError
    from gradscope.lab.sweep import SweepError

    if resume and sweep_run.reports_here():
        from gradscope.lab.sweep import scan_runs

        for problem in scan_runs(target)[1].values():
            typer.echo(f"{problem}: running it again", err=True)
    if not sweep_run.reports_here():  # other ranks train their share quietly
        try:
            sweep_run.run(config, target, data_root, workers, resume)
        except (SweepError, DataError):
            raise typer.Exit(2) from None
        return
    _fetch_data(config.dataset, data_root)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    interrupted = False
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("depth sweep", total=None)

        def show(p: sweep_run.SweepProgress) -> None:
            bar.update(
                task,
                total=p.total_work,
                completed=p.done_work,
                description=f"depth sweep: run {p.done_runs}/{p.total_runs} done",
            )

        try:
            sweep_run.run(config, target, data_root, workers, resume, on_progress=show)
        except (SweepError, DataError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            interrupted = True
    _write_outputs(target)
    if interrupted:
        typer.echo(
            f"interrupted: finished runs and their report are in {target}; "
            f"go on with --resume {target}",
            err=True,
        )
        raise typer.Exit(130)


def _write_outputs(target: Path) -> None:
    import pandas as pd

    from gradscope.lab.sweep import deepest_verdicts, write_outputs
    from gradscope.report import render_sweep_report

    results = write_outputs(target)
    runs = results[1]
    report = render_sweep_report(target, results)
    if len(runs):
        cols = ["variant", "depth", "test_acc", "grad_ratio_init", "grad_decay_init"]
        with pd.option_context("display.width", 160, "display.max_rows", 200):
            typer.echo(
                runs[[*cols, "verdicts_init"]].to_string(
                    index=False, float_format=lambda v: f"{v:.3g}"
                )
            )
        titles = {"init": "at init", "end": "after training"}
        shown = None
        for phase, variant, depth, v in deepest_verdicts(target, runs):
            if phase != shown:
                typer.echo(f"\nverdicts {titles[phase]}, deepest run of each variant:")
                shown = phase
            typer.echo(f"  {variant} depth {depth}: [{v['severity']}] {v['message']}")
    typer.echo(f"\nreport: {report}")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A run folder (rec.save) or a sweep folder.")],
) -> None:
    """Re-render the report of a run folder, or of a depth-sweep folder from its saved runs."""
    from gradscope.lab.sweep import SweepError
    from gradscope.runs import RunError, is_run_folder, load_run

    if is_run_folder(folder):
        from gradscope.report.run import render_run_report

        try:
            run = load_run(folder)
        except RunError as e:
            fail(str(e))
        for v in run.verdicts:
            typer.echo(f"[{v.severity}] {v.id}: {v.message}")
        typer.echo(f"report: {render_run_report(run)}")
        return
    if not (folder / "config.json").is_file() or not (folder / "runs").is_dir():
        fail(
            f"{folder} is neither a run folder (run.json, frame.parquet) nor a depth-sweep "
            "folder (config.json, runs/)"
        )
    try:
        _write_outputs(folder)
    except SweepError as e:
        fail(str(e))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        fail(f"{folder / 'config.json'} is damaged ({e})")


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="The run folder to compare against.")],
    run_b: Annotated[Path, typer.Argument(help="The run folder being checked.")],
    rows: Annotated[int, typer.Option(help="How many of the largest changes to print.")] = 20,
) -> None:
    """Compare two saved runs layer by layer; exit 1 when B has a warning or error A had not.

    Exit codes: 0 B is not worse than A, 1 a verdict of severity warning or error appears in
    B, 2 bad input. Runs are aligned by layer name at their last common recorded step.
    """
    import pandas as pd

    from gradscope.runs import RunError, diff_runs, load_run

    try:
        result = diff_runs(load_run(run_a), load_run(run_b))
    except RunError as e:
        fail(str(e))
    typer.echo(f"{run_a} -> {run_b}, at step {result.step}")
    if len(result.changes):
        typer.echo(f"statistics that changed more than 2x ({len(result.changes)}; largest first):")
        with pd.option_context("display.width", 160):
            typer.echo(
                result.changes.head(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}")
            )
    else:
        typer.echo("no statistic changed by more than 2x")
    for title, verdicts in (("appears in B", result.appeared), ("gone in B", result.disappeared)):
        for v in verdicts:
            typer.echo(f"{title}: [{v.severity}] {v.id}: {v.message}")
    if result.worse:
        raise typer.Exit(1)


reproduce_app = typer.Typer(
    help="Rerun the teaching text's MNIST experiments and check its numbers.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(reproduce_app, name="reproduce")

Seeds = Annotated[str, typer.Option(help="Comma-separated seeds.")]
Dataset = Annotated[str, typer.Option(help="mnist, fashion-mnist, synthetic.")]
Out = Annotated[
    Path | None, typer.Option(help="Output folder; default reports/reproduce-<name>-<time>/.")
]
Quick = Annotated[
    bool, typer.Option(help="A short version for tests and demos (fewer epochs/steps).")
]


def _reproduce(
    name: str,
    seeds: str,
    dataset: str,
    data_root: str | None,
    out: Path | None,
    quick: bool,
    **settings: Any,
) -> None:
    """Runs gradscope.lab.reproduce.<name>(data, seeds, **settings), saves, reports, prints."""
    import pandas as pd

    from gradscope.lab import reproduce as rp
    from gradscope.lab.data import DataError, load_dataset
    from gradscope.report.reproduce import render_reproduction

    seed_list = _int_list(seeds, "--seeds")
    target = out or Path("reports") / f"reproduce-{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    _fetch_data(dataset, data_root)
    try:
        data = load_dataset(dataset, data_root)
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


@reproduce_app.command("journey")
def reproduce_journey(
    seeds: Seeds = "0,1,2",
    epochs: Annotated[int, typer.Option()] = 5,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr_sgd: Annotated[float, typer.Option(help="Learning rate of the SGD row.")] = 0.01,
    lr_adam: Annotated[float, typer.Option(help="Learning rate of the Adam/AdamW rows.")] = 1e-3,
    quick: Quick = False,
    dataset: Dataset = "mnist",
    data_root: DataRoot = None,
    out: Out = None,
) -> None:
    """digit with SGD, Adam, AdamW, AdamW + cosine, and deep-digit: against 93.6 ... 98.1%."""
    _reproduce(
        "journey",
        seeds,
        dataset,
        data_root,
        out,
        quick,
        epochs=epochs,
        batch_size=batch_size,
        train_size=None,
        lr_sgd=lr_sgd,
        lr_adam=lr_adam,
    )


@reproduce_app.command("dropout")
def reproduce_dropout(
    seeds: Seeds = "0,1,2",
    epochs: Annotated[int, typer.Option()] = 20,
    train_size: Annotated[int, typer.Option()] = 1000,
    quick: Quick = False,
    dataset: Dataset = "mnist",
    data_root: DataRoot = None,
    out: Out = None,
) -> None:
    """1,000 training examples with and without dropout 0.2: train/test accuracy and the gap.

    The comparison is repeated at 50 and 100 epochs (not with --quick): the effect fades
    with longer training.
    """
    _reproduce(
        "dropout",
        seeds,
        dataset,
        data_root,
        out,
        quick,
        epochs=epochs,
        train_size=train_size,
        also_epochs=(50, 100),
    )


@reproduce_app.command("regularization")
def reproduce_regularization(
    seeds: Seeds = "0,1,2",
    epochs: Annotated[int, typer.Option()] = 5,
    l1: Annotated[float, typer.Option(help="L1 penalty strength (in the loss).")] = 1e-4,
    l1_proximal: Annotated[
        float, typer.Option(help="L1 proximal strength (threshold lr * this).")
    ] = 0.1,
    quick: Quick = False,
    dataset: Dataset = "mnist",
    data_root: DataRoot = None,
    out: Out = None,
) -> None:
    """L2 (AdamW weight decay) against L1 (penalty and proximal): weight norms and zeros."""
    _reproduce(
        "regularization",
        seeds,
        dataset,
        data_root,
        out,
        quick,
        epochs=epochs,
        train_size=None,
        l1=l1,
        l1_proximal=l1_proximal,
    )


@reproduce_app.command("clipping")
def reproduce_clipping(
    seeds: Seeds = "0,1,2",
    depth: Annotated[int, typer.Option(help="Residual blocks (no normalization).")] = 50,
    steps: Annotated[int, typer.Option()] = 300,
    lr: Annotated[float, typer.Option()] = 0.05,
    clip: Annotated[float, typer.Option()] = 1.0,
    quick: Quick = False,
    dataset: Dataset = "mnist",
    data_root: DataRoot = None,
    out: Out = None,
) -> None:
    """A residual stack with exploding gradients, trained with and without clipping at 1.0."""
    _reproduce(
        "clipping",
        seeds,
        dataset,
        data_root,
        out,
        quick,
        depth=depth,
        steps=steps,
        lr=lr,
        clip=clip,
    )


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="gradscope")
