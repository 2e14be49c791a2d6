"""Did the fix work? For each labelled run: a trial of the remedies its verdicts propose (no
remedy named by hand), the top-ranked remedy's rerun from the same start judged against the
matching healthy control; and for each healthy control, that nothing was proposed. Prints the
repair rate per fault class beside detection, and writes JSON.

A repair: the top remedy's final loss (mean over the last tenth of the steps) within 10% of
its healthy control's, or every warning/error verdict of the faulty run cleared with the loss
decreasing (final below the first tenth's mean). "top" is the trial's measured best (where no
remedy beat the baseline by more than 2%: the first proposed that ran); "first" (a column
beside it) is the remedy proposed first, before anything is measured.

    python -m benchmarks.faults.repair [--set registry|heldout|mine] [--split all|tune|heldout|variant]
        [--only NAME] [--seed 0 [1 ...]] [--check] [--markdown] [--json out.json]

`--set registry` (default): the fault benchmark's cases (benchmarks/faults/registry.py); the
remedies were added after reading their first pass, so this is not a held-out measurement.
`--set heldout`: runs the remedies were never tuned on (benchmarks/faults/repair_heldout.py:
the registry's held-out half and variants of every remedied class with another size and
optimizer, at seeds 2 and 3 unless --seed says otherwise), each faulty run checked in plain
torch first (as --check does for the registry); a run whose check fails is not scored.
`--set mine`: benchmarks/faults/remedy_cases.py, the runs the proposals were first tuned on.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradscope as gs
from gradscope.remedies import Trial, TrialRun

# Fault classes a remedy in the catalog addresses (both sets' labels). The others (NaN made
# on purpose in one module's forward or backward, an operation undefined at a point; a
# detached graph) are counted for detection only.
REMEDIED = {
    "lr_too_high", "lr_jump", "not_zeroed", "zero_grad_forgotten", "lr_zero", "not_in_optimizer",
    "dead_relu", "dead_units", "exploding_init", "exploding", "vanishing", "saturation",
    "post_ln_no_warmup", "bad_batch", "unnormalized_inputs",
}  # fmt: skip
# In the registry one class holds a cause with a remedy (a layer frozen by mistake: unfreeze)
# and one without (a detached graph): judged per case.
NO_REMEDY_CASES = {"detached_graph"}
REMEDY_CASES = {"frozen_by_mistake"}
# The registry's healthy control for each faulty case: the same data and model family, trained
# as intended.
CONTROLS = {
    **dict.fromkeys(
        ["vanishing_init", "vanishing_sigmoid", "vanishing_depth", "vanishing_depth_tanh",
         "exploding_init", "exploding_tanh", "exploding_depth"], "h_mlp_relu_deep6"),
    **dict.fromkeys(
        ["lr_high_sgd", "lr_jump_mlp", "bad_batch_mlp", "nan_forward_mlp", "nan_backward_norm",
         "dead_bias_mlp", "saturated_tanh", "unnormalized_pixels", "frozen_by_mistake",
         "detached_graph", "not_in_optimizer_mlp", "no_zero_grad_mlp", "lr_zero_sgd"],
        "h_mlp_relu_sgd"),
    **dict.fromkeys(
        ["lr_high_cnn", "nan_forward_cnn", "nan_backward_std", "dead_bias_cnn",
         "not_in_optimizer_cnn"], "h_cnn_bn_pool_sgd"),
    **dict.fromkeys(
        ["lr_high_adam_transformer", "lr_zero_schedule", "postln_no_warmup"],
        "h_transformer_preln_adam"),
    **dict.fromkeys(["lr_jump_lstm", "no_zero_grad_lstm"], "h_lstm_adam"),
    "lr_jump_resmlp": "h_resmlp_deep",
    **dict.fromkeys(
        ["bad_batch_synth_adam", "saturated_sigmoid", "unnormalized_offset"],
        "h_mlp_relu_adam_synth"),
}  # fmt: skip


@dataclass
class RepairCase:
    """One labelled run as a trial needs it."""

    name: str
    fault: str
    make: Any
    step: Any
    batches: list[Any] = field(repr=False)
    control: str | None
    split: str = "tune"
    # the registry's Case, for its plain-torch check (None: not checkable, the `mine` set)
    source: Any = field(default=None, repr=False)
    has_remedy: bool | None = None  # None: judged by the fault class

    @property
    def remedied(self) -> bool:
        if self.has_remedy is not None:
            return self.has_remedy
        return (self.fault in REMEDIED or self.name in REMEDY_CASES) and (
            self.name not in NO_REMEDY_CASES
        )


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


def _load(which: str, seed: int = 0) -> list[RepairCase]:
    if which == "mine":
        from benchmarks.faults import remedy_cases

        return [
            RepairCase(c.name, c.fault, c.make, c.step, c.batches, c.control, "tune")
            for c in remedy_cases.cases()
        ]
    if which == "registry":
        from benchmarks.faults.registry import CASES

        return [_from_registry(c, seed) for c in CASES]
    if which == "heldout":
        from benchmarks.faults import repair_heldout as held
        from benchmarks.faults.registry import CASES

        # the registry's healthy controls always (its held-out faults are judged against
        # them), its held-out faults, and the variants with their own controls
        chosen = [c for c in CASES if c.healthy or c.split == "heldout"]
        out = [_from_registry(c, seed) for c in chosen]
        for c in held.VARIANTS:
            case = _from_registry(c, seed, held.CONTROLS.get(c.name))
            case.split, case.has_remedy = "variant", c.name in held.REMEDY_CASES
            out.append(case)
        return out
    raise SystemExit(f"unknown case set {which!r}; choose registry, heldout or mine")


def _from_registry(case: Any, seed: int, control: str | None = None) -> RepairCase:
    """A registry case as a trial's make/step/batches. Its step closure keeps state (a
    scheduler made on first use), so each optimizer a run steps gets the step of a fresh
    build."""
    setup = case.build(seed)
    steps: dict[int, tuple[torch.optim.Optimizer, Any]] = {}

    def step(model: nn.Module, opt: torch.optim.Optimizer, item: Any) -> torch.Tensor:
        if id(opt) not in steps:
            steps[id(opt)] = (opt, case.build(seed).step)  # (opt kept: its id stays unique)
        t, batch = item
        return steps[id(opt)][1](model, opt, batch, t, lambda loss: None)

    return RepairCase(
        case.name,
        case.cause,
        lambda: (setup.model, setup.optimizer),
        step,
        list(enumerate(setup.batches)),
        control or CONTROLS.get(case.name),
        case.split,
        case,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="cases", default="registry")
    parser.add_argument("--split", default="all", choices=["all", "tune", "heldout", "variant"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--seed", type=int, nargs="+", default=None,
        help="build and trial seeds, each a run of the whole set (default 0; heldout: 2 3)",
    )  # fmt: skip
    parser.add_argument("--check", action="store_true", help="check each run in plain torch")
    parser.add_argument("--no-check", action="store_true", help="(heldout) checks already run")
    parser.add_argument(
        "--part", default="1/1", help="i/n: every n-th faulty run from the i-th (controls: all)"
    )
    parser.add_argument("--controls", choices=["all", "used"], default="all",
                        help="used: only the healthy runs some faulty run is judged against")  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="only summarize the rows of earlier --json files"
    )
    args = parser.parse_args()
    if args.combine:
        # (each part ran the controls it needed: a control counted once per seed)
        unique = {
            (r["case"], r["seed"]): r for p in args.combine for r in json.loads(p.read_text())
        }
        rows = list(unique.values())
        _report([r for r in rows if r.get("check_ok", True)], rows, args.markdown)
        return
    seeds = args.seed or ([2, 3] if args.cases == "heldout" else [0])
    check = (args.check or args.cases == "heldout") and not args.no_check
    part, parts = (int(x) for x in args.part.split("/"))
    rows = []
    began = time.perf_counter()
    for seed in seeds:
        controls: dict[str, float] = {}
        cases = _load(args.cases, seed)
        faulty = [c for c in cases if c.fault != "healthy"]
        faulty = [c for c in faulty if not args.only or args.only in c.name]
        faulty = [c for c in faulty if args.split in ("all", c.split)][part - 1 :: parts]
        used = {c.control for c in faulty}
        for case in cases:
            if case.fault == "healthy":
                if args.controls == "used" and case.name not in used:
                    continue
            elif not any(case is c for c in faulty):
                continue
            checked = _check(case, seed) if check else (True, "")
            trial = gs.try_remedies(case.make, case.step, case.batches, steps=len(case.batches),
                                    seed=seed, workers=args.workers)  # fmt: skip
            if case.fault == "healthy":
                controls[case.name] = trial.baseline.final_loss if checked[0] else math.nan
            row = _row(case, trial, controls.get(case.control or "", math.nan))
            row.update(seed=seed, check_ok=checked[0], check=checked[1])
            rows.append(row)
            print(
                f"s{seed} {case.name:34s} {case.fault:20s} detected={row['detected']!s:5s} "
                f"top={row['top']!s:18s} loss {row['baseline_loss']:.3g} -> "
                f"{row['top_loss'] if row['top_loss'] is not None else float('nan'):.3g} "
                f"(control {row['control_loss']:.3g}) repaired={row['repaired_top']} "
                f"first={row['first']} ({row['repaired_first']}) [{row['verdicts']}]"
                + ("" if checked[0] else f"  CHECK FAILED, not scored: {checked[1]}"),
                flush=True,
            )
    _report([r for r in rows if r["check_ok"]], rows, args.markdown)
    print(f"seeds {seeds}, total {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


def _report(scored: list[dict[str, Any]], rows: list[dict[str, Any]], markdown: bool) -> None:
    _summary(scored)
    failed = [f"{r['case']} (seed {r['seed']}: {r['check']})" for r in rows if not r["check_ok"]]
    print(f"runs whose plain-torch check failed, not scored: {len(failed)}"
          + (f": {'; '.join(failed)}" if failed else ""))  # fmt: skip
    if markdown:
        _markdown(scored)


def _check(case: RepairCase, seed: int) -> tuple[bool, str]:
    """The registry's own plain-torch check of the run (its fault is there, or a control
    trains), run apart from the trial."""
    if case.source is None:
        return True, "not checkable"
    from benchmarks.faults.run import run_case

    record = run_case(case.source, seed)
    return bool(record["check_ok"]), str(record["check"])


def _row(case: RepairCase, trial: Trial, control: float) -> dict[str, Any]:
    best = trial.best
    first_run = next((r for r in trial.runs[1:] if r.losses), None)
    # the remedy a user is pointed to: the measured best, else (nothing beat the baseline by
    # more than 2%) the first proposed that ran
    best_run = next((r for r in trial.runs if best is not None and r.remedy is best), first_run)
    return {
        "case": case.name,
        "fault": case.fault,
        "split": case.split,
        "remedied": case.remedied,
        "detected": bool(trial.baseline.problems),
        "verdicts": ", ".join(trial.baseline.problems),
        "proposed": [r.name for r in trial.runs[1:]],
        "top": best_run.name if best_run else None,
        "measured_best": best is not None,
        "baseline_loss": trial.baseline.final_loss,
        "top_loss": best_run.final_loss if best_run else None,
        "control_loss": control,
        "repaired_top": _trains(trial, best_run, control),
        "first": first_run.name if first_run else None,
        "repaired_first": _trains(trial, first_run, control),
        "seconds": sum(r.seconds for r in trial.runs),
    }


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
        with_remedy = sum(r["remedied"] for r in part)
        tag = "" if with_remedy == n else f"  ({n - with_remedy} with no remedy for the cause)"
        print(f"  {fault:20s} {n:2d} runs  detected {detected}/{n}  proposed {proposed}/{n}  "
              f"repaired {top}/{n} (first proposed {first}/{n}){tag}")  # fmt: skip
    faulty = [r for r in rows if r["fault"] != "healthy" and r["remedied"]]
    healthy = [r for r in rows if r["fault"] == "healthy"]
    if faulty:
        n = len(faulty)
        top = sum(r["repaired_top"] for r in faulty)
        first = sum(r["repaired_first"] for r in faulty)
        strict = sum(r["repaired_top"] and r["measured_best"] for r in faulty)
        print(f"repair rate over faulty runs whose cause has a remedy: {top}/{n} = {top / n:.0%} "
              f"by the top remedy (target >= 80%), {first}/{n} by the first proposed; "
              f"{strict}/{n} = {strict / n:.0%} where the top remedy also measurably beat the "
              "faulty run")  # fmt: skip
        for split in ("tune", "heldout", "variant"):
            part = [r for r in faulty if r["split"] == split]
            if part:
                won = sum(r["repaired_top"] for r in part)
                print(f"  {split} split of the cases: {won}/{len(part)}")
    if healthy:
        bad = sum(bool(r["proposed"]) for r in healthy)
        print(f"healthy runs with a remedy proposed: {bad}/{len(healthy)} (target 0)")


def _markdown(rows: list[dict[str, Any]]) -> None:
    print("\n| fault class | runs | detected | repaired | the top remedy (repaired or not) |")
    print("|---|---|---|---|---|")
    for fault in dict.fromkeys(r["fault"] for r in rows):
        part = [r for r in rows if r["fault"] == fault]
        n = len(part)
        if fault == "healthy":
            proposed = sum(bool(r["proposed"]) for r in part)
            print(f"| healthy controls | {n} | warned {sum(r['detected'] for r in part)} | "
                  f"remedy proposed for {proposed} | - |")  # fmt: skip
            continue
        remedied = [r for r in part if r["remedied"]]
        won = f"{sum(r['repaired_top'] for r in remedied)}/{len(remedied)}" if remedied else "-"
        if len(remedied) < n:
            won += f" ({n - len(remedied)} without a remedy)"
        tops = ", ".join(
            f"{r['top'] or 'none'}{'' if r['measured_best'] or not r['top'] else '*'} "
            f"{'yes' if r['repaired_top'] else 'no'}"
            for r in part
        )
        print(f"| {fault} | {n} | {sum(r['detected'] for r in part)} | {won} | {tops} |")


if __name__ == "__main__":
    main()
