"""Did the fix work? For each labelled run: a trial of the remedies its verdicts propose (no
remedy named by hand), the top-ranked remedy's rerun from the same start judged against the
matching healthy control; and for each healthy control, that nothing was proposed.

A repair: the top remedy's final loss (mean over the last tenth of 200 steps) within 10% of
its healthy control's, or every warning/error verdict of the faulty run cleared with the loss
decreasing (final below the first tenth's mean). "top" is the trial's measured best; "first"
(a column beside it) is the remedy proposed first, before anything is measured.

    python benchmarks/repair.py [--cases mine] [--json out.json] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradscope as gs  # noqa: E402
from gradscope.remedies import Trial, TrialRun  # noqa: E402

# Fault labels a remedy in the catalog addresses; the others (unnormalized inputs, an
# operation undefined at a point, a detached graph) are counted for detection only.
REMEDIED = {
    "lr_too_high", "lr_jump", "not_zeroed", "lr_zero", "not_in_optimizer", "frozen_by_mistake",
    "dead_relu", "exploding_init", "vanishing", "saturation", "postln_no_warmup",
}  # fmt: skip
WITHIN = 0.10


def _trains(trial: Trial, run: TrialRun | None, control_loss: float) -> bool:
    if run is None or not run.losses:
        return False
    final = run.final_loss
    if math.isfinite(control_loss) and final <= (1 + WITHIN) * control_loss:
        return True
    losses = np.asarray(run.losses, float)
    head = losses[: max(1, len(losses) // 10)]
    cleared = not set(trial.baseline.problems) & set(run.problems)
    return cleared and math.isfinite(final) and final < float(np.mean(head))


def _load(which: str) -> list[Any]:
    if which == "mine":
        import remedy_cases

        return remedy_cases.cases()
    raise SystemExit(f"unknown case set {which!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default="mine")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cases = _load(args.cases)
    controls: dict[str, float] = {}
    rows = []
    began = time.perf_counter()
    for case in cases:
        if args.only and args.only not in case.name and case.fault != "healthy":
            continue
        trial = gs.try_remedies(case.make, case.step, case.batches, steps=case.steps, seed=0,
                                workers=args.workers)  # fmt: skip
        if case.fault == "healthy":
            controls[case.name] = trial.baseline.final_loss
        best = trial.best
        best_run = next((r for r in trial.runs if best is not None and r.remedy is best), None)
        first_run = next((r for r in trial.runs[1:] if r.skipped is None), None)
        control = controls.get(case.control or "", math.nan)
        row = {
            "case": case.name,
            "fault": case.fault,
            "detected": bool(trial.baseline.problems),
            "verdicts": ", ".join(trial.baseline.problems),
            "proposed": [r.name for r in trial.runs[1:]],
            "top": best.name if best else None,
            "baseline_loss": trial.baseline.final_loss,
            "top_loss": best_run.final_loss if best_run else None,
            "control_loss": control,
            "repaired_top": _trains(trial, best_run, control),
            "first": first_run.name if first_run else None,
            "repaired_first": _trains(trial, first_run, control),
            "seconds": sum(r.seconds for r in trial.runs),
        }
        rows.append(row)
        print(
            f"{case.name:36s} {case.fault:20s} detected={row['detected']!s:5s} "
            f"top={row['top']!s:18s} loss {row['baseline_loss']:.3g} -> "
            f"{row['top_loss'] if row['top_loss'] is not None else float('nan'):.3g} "
            f"(control {control:.3g}) repaired={row['repaired_top']} "
            f"first={row['first']} ({row['repaired_first']}) [{row['verdicts']}]",
            flush=True,
        )
    _summary(rows)
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


def _summary(rows: list[dict[str, Any]]) -> None:
    print("\nper class: runs, detected, proposed a remedy, repaired by the top remedy, "
          "by the first proposed")  # fmt: skip
    classes = dict.fromkeys(r["fault"] for r in rows)
    for fault in classes:
        part = [r for r in rows if r["fault"] == fault]
        n = len(part)
        detected = sum(r["detected"] for r in part)
        proposed = sum(bool(r["proposed"]) for r in part)
        if fault == "healthy":
            print(
                f"  {fault:20s} {n:2d} runs  warned {detected}/{n}  remedy proposed {proposed}/{n}"
            )
            continue
        top = sum(r["repaired_top"] for r in part)
        first = sum(r["repaired_first"] for r in part)
        tag = "" if fault in REMEDIED else "  (no remedy for this cause)"
        print(f"  {fault:20s} {n:2d} runs  detected {detected}/{n}  proposed {proposed}/{n}  "
              f"repaired {top}/{n} (first proposed {first}/{n}){tag}")  # fmt: skip
    faulty = [r for r in rows if r["fault"] != "healthy" and r["fault"] in REMEDIED]
    healthy = [r for r in rows if r["fault"] == "healthy"]
    if faulty:
        top = sum(r["repaired_top"] for r in faulty)
        first = sum(r["repaired_first"] for r in faulty)
        print(f"repair rate over faulty runs whose cause has a remedy: {top}/{len(faulty)} = "
              f"{top / len(faulty):.0%} by the top remedy, {first}/{len(faulty)} by the first "
              "proposed (target >= 80%)")  # fmt: skip
    if healthy:
        bad = sum(bool(r["proposed"]) for r in healthy)
        print(f"healthy runs with a remedy proposed: {bad}/{len(healthy)} (target 0)")


if __name__ == "__main__":
    main()
