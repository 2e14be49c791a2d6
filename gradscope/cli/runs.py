"""gradscope diff: two saved runs compared layer by layer, with exit codes for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradscope.cli.common import app, fail

SHOWN = 8  # unmatched layer names printed before "and N more"


def _names(names: list[str]) -> str:
    more = f", and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _num(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="The run folder to compare against.")],
    run_b: Annotated[Path, typer.Argument(help="The run folder being checked.")],
    rows: Annotated[int, typer.Option(help="How many of the largest changes to print.")] = 20,
    strip_prefix: Annotated[
        str | None,
        typer.Option(
            help="A layer-name prefix to remove from both runs (e.g. 'model.'); by default a "
            "first name part shared by every layer of one run is removed where that matches "
            "more layers."
        ),
    ] = None,
    worse_factor: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="A verdict both runs have fails the diff when its measure (e.g. the "
            "first/last gradient ratio) moves the bad way by more than this factor.",
        ),
    ] = 10.0,
) -> None:
    """Compare two saved runs layer by layer; exit 1 when B is worse than A.

    Exit codes: 0 B is not worse than A; 1 a verdict of severity warning or error appears in
    B, or a verdict both have rises in severity or moves the bad way by more than
    --worse-factor; 2 bad input. Runs are aligned by layer name at their last common step.
    """
    import pandas as pd

    from gradscope.diff import diff_runs
    from gradscope.runs import RunError, load_run

    try:
        result = diff_runs(load_run(run_a), load_run(run_b), strip_prefix, worse_factor)
    except RunError as e:
        fail(str(e))
    typer.echo(f"{run_a} -> {run_b}, at step {result.step}")
    if result.aligned:
        typer.echo(f"aligned: {result.aligned}")
    unmatched = len(result.only_a) + len(result.only_b)
    typer.echo(f"{result.matched} layers compared, {unmatched} without a match")
    if result.only_a:
        typer.echo(f"only in A ({len(result.only_a)}): {_names(result.only_a)}")
    if result.only_b:
        typer.echo(f"only in B ({len(result.only_b)}): {_names(result.only_b)}")
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
    for w in result.worsened:
        if w.measure == "severity":
            how = f"severity {w.a.severity} -> {w.b.severity}"
        else:
            how = (
                f"{w.measure} {_num(w.a.evidence.get(w.measure, len(w.a.layers)))} -> "
                f"{_num(w.b.evidence.get(w.measure, len(w.b.layers)))} (worse by "
                f"{w.factor:.3g}x, more than {worse_factor:g}x)"
            )
        typer.echo(f"worse in B: [{w.b.severity}] {w.b.id}: {how}")
    if result.worse:
        raise typer.Exit(1)
