"""gradscope depth-sweep and gradscope report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gradscope.cli.common import DataRoot, app, fail, fetch_data, int_list
from gradscope.lab.choices import Activation, DatasetName, Init, OptimizerName

if TYPE_CHECKING:
    from gradscope.lab.sweep import SweepConfig


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
    activation: Annotated[Activation, typer.Option()] = Activation.RELU,
    init: Annotated[Init, typer.Option()] = Init.DEFAULT,
    optimizer: Annotated[
        OptimizerName,
        typer.Option(
            help="sgd (momentum 0.9) by default: Adam-like optimizers rescale small gradients and hide vanishing."
        ),
    ] = OptimizerName.SGD,
    lr: Annotated[float | None, typer.Option(help="Default: sgd 0.05, adam/adamw 1e-3.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps per run (overrides --epochs).")
    ] = 500,
    epochs: Annotated[int, typer.Option(help="Epochs per run, used when --steps is 0.")] = 1,
    batch_size: Annotated[int, typer.Option()] = 128,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    dataset: Annotated[DatasetName, typer.Option()] = DatasetName.MNIST,
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
    workers: Annotated[
        int, typer.Option(help="Worker processes (runs go in parallel).", min=1)
    ] = 2,
) -> None:
    """Train every variant across depths and show where gradients vanish or explode.

    Writes frame.parquet, runs.csv, report.html and config.json, each run saved as it finishes.
    """
    from gradscope.lab.sweep import SweepConfig, default_depths

    if resume is not None and out is not None and out != resume:
        fail("give either --out or --resume, not both")
    if depths is not None:
        depth_list = sorted(set(int_list(depths, "--depths")))
    else:
        depth_list = default_depths(min_depth, max_depth)
    # (a SweepConfig validates itself: a SweepError is one line and exit 2, as every error)
    config = SweepConfig(
        depths=tuple(depth_list),
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        width=width,
        activation=activation.value,
        init=init.value,
        optimizer=optimizer.value,
        lr=lr,
        steps=steps or None,
        epochs=epochs,
        batch_size=batch_size,
        seeds=tuple(int_list(seeds, "--seeds")),
        dataset=dataset.value,
        every=every,
    )
    target = resume or out or Path("reports") / f"depth-sweep-{dt.datetime.now():%Y%m%d-%H%M%S}"
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

    from gradscope.lab.data import DataError
    from gradscope.lab.sweep import SweepError, SweepProgress, reports_here, run_sweep, scan_runs
    from gradscope.lab.sweep.signals import stop_if_asked, stop_on_signals
    from gradscope.report.sweep import ProgressReport

    if resume and reports_here():
        for problem in scan_runs(target)[1].values():
            typer.echo(f"{problem}: running it again", err=True)
    if not reports_here():  # other ranks train their share quietly
        try:
            run_sweep(config, target, data_root, workers, resume)
        except (SweepError, DataError):
            raise typer.Exit(2) from None
        return
    fetch_data(config.dataset, data_root)
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

        latest: dict[str, Any] = {"runs": 0, "text": ""}

        def show(p: SweepProgress) -> None:
            if p.done_runs != latest["runs"]:  # a run finished: its cell of the map
                latest["runs"], latest["text"] = p.done_runs, _latest_cell(target)
            bar.update(
                task,
                total=p.total_work,
                completed=p.done_work,
                description=f"depth sweep: run {p.done_runs}/{p.total_runs} done" + latest["text"],
            )

        try:
            with stop_on_signals():
                run_sweep(
                    config,
                    target,
                    data_root,
                    workers,
                    resume,
                    on_progress=show,
                    # report.html from the first finished run on, rewritten as runs finish
                    on_run_finished=ProgressReport(target),
                )
                stop_if_asked()  # a stop that library code swallowed still counts
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


def _latest_cell(target: Path) -> str:
    """The newest finished run as its cell of the trainability map, e.g. '; latest plain
    d32: 11% chance', or '' when it cannot be read yet."""
    import json
    from types import SimpleNamespace

    from gradscope.lab.sweep import cell_verdict

    rows = sorted((target / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    try:
        row = json.loads(rows[-1].read_text())
        word = cell_verdict(SimpleNamespace(**row))
        return f"; latest {row['variant']} d{row['depth']}: {row['test_acc']:.0%} {word}"
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return ""


def _write_outputs(target: Path) -> None:
    import pandas as pd

    from gradscope.lab.sweep import write_outputs
    from gradscope.report import render_sweep_report

    result = write_outputs(target)
    runs = result.runs
    report = render_sweep_report(result)
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
        for phase, run, v in result.deepest_verdicts():
            if phase != shown:
                typer.echo(f"\nverdicts {titles[phase]}, deepest run of each variant:")
                shown = phase
            typer.echo(f"  {run.variant} depth {run.depth}: [{v['severity']}] {v['message']}")
    typer.echo(f"\nreport: {report}")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A run folder (rec.save) or a sweep folder.")],
) -> None:
    """Re-render the report of a run folder, or of a depth-sweep folder from its saved runs."""
    from gradscope.lab.sweep import SweepError
    from gradscope.runs import RunError, is_run_folder, load_run

    if is_run_folder(folder):
        from gradscope.analysis.render import render
        from gradscope.report.run import render_run_report

        try:
            run = load_run(folder)
        except RunError as e:
            fail(str(e))
        for v in run.verdicts:
            typer.echo(render(v))
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
