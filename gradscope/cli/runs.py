"""gradscope diff: two saved runs compared layer by layer, with exit codes for CI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gradscope.cli.common import app, fail

if TYPE_CHECKING:
    pass


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
    from gradscope.analysis.render import headline

    for title, verdicts in (("appears in B", result.appeared), ("gone in B", result.disappeared)):
        for v in verdicts:
            typer.echo(f"{title}: {headline(v)}")
    if result.worse:
        raise typer.Exit(1)
