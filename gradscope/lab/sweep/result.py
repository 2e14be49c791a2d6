"""A depth sweep's finished runs as data (SweepResult), what the reports render: the run
table, the merged frames, each run's verdicts, the deepest run of each variant, one word per
run, and what trains where a cell fails, measured from the sweep's own runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gradscope.lab.models import Variant
from gradscope.lab.sweep.config import RunSpec, SweepConfig

CHANCE = 0.15  # test accuracy at or below this on 10 classes: nothing was learned
TRAINS = 0.5  # test accuracy above this: the run trains
FAILS = ("diverged", "chance", "vanishing", "exploding")  # the words of a failing run

# The change that turns a plain stack into each variant, as a user writes it in their own
# model's forward (`block` is the stack's Linear -> activation -> Linear, `norm` one per block)
ADOPT = {
    Variant.RESIDUAL: "x = x + block(x)  # a skip connection around each block",
    Variant.PRELN: "x = x + block(norm(x))  # norm = nn.LayerNorm(width); one more before the head",
    Variant.POSTLN: "x = norm(x + block(x))  # norm = nn.LayerNorm(width)",
    Variant.RMSNORM: "x = x + block(norm(x))  # norm = nn.RMSNorm(width); one more before the head",
    Variant.BATCHNORM: "x = x + block(norm(x))  # norm = nn.BatchNorm1d(width)",
}


def cell_verdict(row: Any) -> str:
    """One word for a run (a record with diverged, test_acc, verdicts): diverged, chance,
    vanishing, exploding or healthy."""
    ids = set(str(row.verdicts).split(";")) if isinstance(row.verdicts, str) else set()
    if bool(row.diverged) or "nonfinite_values" in ids:
        return "diverged"
    if not row.test_acc > CHANCE:
        return "chance"
    if "vanishing_gradients" in ids:
        return "vanishing"
    if "exploding_gradients" in ids:
        return "exploding"
    return "healthy"


def deepest_runs(runs: pd.DataFrame, every_seed: bool = False) -> pd.DataFrame:
    """The deepest run of each variant (its first seed), in the variants' order of appearance:
    what the report's per-variant figures and verdicts show. With `every_seed`, every seed's
    run at each variant's largest depth (for bands over seeds)."""
    if every_seed:
        return runs[runs["depth"] == runs.groupby("variant")["depth"].transform("max")]
    first_seed = runs[runs["seed"] == runs.groupby("variant")["seed"].transform("min")]
    return first_seed.sort_values("depth").groupby("variant", sort=False).tail(1)


@dataclass(frozen=True, eq=False)
class SweepResult:
    """A depth sweep's finished runs, as `gradscope.lab.sweep.load_sweep(folder)` reads them.

    Attributes:
        config: the sweep's options.
        runs: one row per finished run (runs.csv's columns), by variant, depth and seed.
        frame: every run's recorded frame, long form, with variant, depth and seed columns.
        losses: every run's training loss per step (variant, depth, seed, step, loss).
        details: each run's verdicts by run id: {"init": [...], "end": [...]} (as dicts).
        folder: the sweep folder it was read from.
    """

    config: SweepConfig
    runs: pd.DataFrame
    frame: pd.DataFrame
    losses: pd.DataFrame
    details: dict[str, dict[str, list[dict[str, Any]]]]
    folder: Path | None = None

    @property
    def planned(self) -> int:
        """How many runs the sweep's configuration plans."""
        c = self.config
        return len(c.variants) * len(c.depths) * len(c.seeds)

    @property
    def variants(self) -> list[str]:
        """The configuration's variants that have a finished run, in its order."""
        done = set(self.runs["variant"])
        return [v for v in self.config.variants if v in done]

    @staticmethod
    def run_id(row: Any) -> str:
        """The run id of a row of `runs` (a record or a mapping), e.g. 'plain-d6-s0'."""
        return RunSpec.of(row).run_id

    def deepest(self, every_seed: bool = False) -> pd.DataFrame:
        """The deepest run of each variant (see deepest_runs)."""
        return deepest_runs(self.runs, every_seed)

    def deepest_verdicts(self) -> list[tuple[str, RunSpec, dict[str, Any]]]:
        """(phase, run, verdict) of the deepest run of each variant, at init ("init"), then
        after training ("end")."""
        deepest = [RunSpec.of(r) for r in self.deepest().itertuples()]
        return [
            (phase, run, v)
            for phase in ("init", "end")
            for run in deepest
            for v in self.details.get(run.run_id, {}).get(phase, [])
        ]

    def cells(self) -> pd.DataFrame:
        """One row per variant x depth over its seeds: variant, depth, runs, test_acc (mean),
        grad_ratio_init and grad_ratio_end (medians), word (the commonest of cell_verdict)."""
        runs = self.runs.assign(word=[cell_verdict(r) for r in self.runs.itertuples()])
        return (
            runs.groupby(["variant", "depth"], sort=False)
            .agg(
                runs=("seed", "size"),
                test_acc=("test_acc", "mean"),
                grad_ratio_init=("grad_ratio_init", "median"),
                grad_ratio_end=("grad_ratio_end", "median"),
                word=("word", lambda w: w.mode().iloc[0]),
            )
            .reset_index()
        )

    def what_trains(self) -> pd.DataFrame:
        """For each failing cell (a variant x depth whose gradients vanish or explode, that
        diverges or stays near chance), what trains at that depth in this sweep: one row per
        (failing cell, variant that trains there), best first, and one row with `fix` empty
        where nothing does. Columns: variant, depth, word, test_acc, grad_ratio_init,
        grad_ratio_end (the failing cell's), fix, fix_acc, code (the line that adopts the fix),
        trains_to (the failing variant's deepest depth below this one that trains, else NaN).

        Measured, not predicted: a variant is named only where its own runs at that depth
        train (healthy, test accuracy above TRAINS, mean over seeds)."""
        columns = ["variant", "depth", "word", "test_acc", "grad_ratio_init", "grad_ratio_end"]
        columns += ["fix", "fix_acc", "code", "trains_to"]
        if self.runs.empty:
            return pd.DataFrame(columns=columns)
        cells = self.cells()
        good = cells[(cells["word"] == "healthy") & (cells["test_acc"] > TRAINS)]
        rows = []
        for cell in cells[cells["word"].isin(FAILS)].itertuples():
            below = good[(good["variant"] == cell.variant) & (good["depth"] < cell.depth)]
            trains_to = below["depth"]
            base = {c: getattr(cell, c) for c in columns[:6]}
            base["trains_to"] = trains_to.max() if len(trains_to) else math.nan
            fixes = good[good["depth"] == cell.depth].sort_values("test_acc", ascending=False)
            for fix in fixes.itertuples():
                code = ADOPT.get(Variant(fix.variant), "")
                rows.append({**base, "fix": fix.variant, "fix_acc": fix.test_acc, "code": code})
            if fixes.empty:
                rows.append({**base, "fix": "", "fix_acc": math.nan, "code": ""})
        return pd.DataFrame(rows, columns=columns)

    def _repr_html_(self) -> str:
        from gradscope.integrations.notebook import sweep_html

        return sweep_html(self)
