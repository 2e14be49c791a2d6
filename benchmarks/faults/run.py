"""Runs the labelled fault benchmark: each case recorded by gradscope and checked in plain
torch, then scored (recall, false alarms, cause and layer named first, detection lead).

    python -m benchmarks.faults [--split tune|heldout|blind|all] [--only NAME ...] [--out DIR]
        [--seed N] [--online] [--check-only]

Splits: "tune" (rules may be tuned on it), "heldout" (held out in session 1, looked at since),
"blind" (benchmarks.faults.blind: frozen before session 2 changed any rule, scored once).

Prints one line per run as it finishes and a table per fault class and split; writes one JSON
per run into DIR (default benchmarks/faults/results/) as it is produced, and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradscope as gs
from benchmarks.faults.blind import BLIND
from benchmarks.faults.registry import CASES, Case, Trace

ALARM = ("warning", "error")
OUT = Path(__file__).parent / "results"


def _layer_matches(named: str | None, label: str | None) -> bool:
    if named is None or label is None:
        return False
    return named == label or named.startswith(label + ".") or named.startswith(label + "[")


def _probe(model: nn.Module, batch: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Plain torch, on one batch: per activation module, the share of units (dim 1, or the
    channel) zero for every sample, and of outputs within 1% of a bound."""
    dead: dict[str, float] = {}
    sat: dict[str, float] = {}
    handles = []

    def hook(name: str, module: nn.Module):  # type: ignore[no-untyped-def]
        def fn(_m, _i, out):  # type: ignore[no-untyped-def]
            if not isinstance(out, torch.Tensor) or out.ndim < 2:
                return
            if isinstance(module, nn.ReLU):
                unit = out.transpose(0, 1).reshape(out.shape[1], -1)
                dead[name] = float((unit == 0).all(1).float().mean())
            if isinstance(module, nn.Tanh):
                sat[name] = float((out.abs() > 0.99).float().mean())
            if isinstance(module, nn.Sigmoid):
                sat[name] = float(((out < 0.01) | (out > 0.99)).float().mean())

        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU | nn.Tanh | nn.Sigmoid):
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        with torch.no_grad():
            x = batch[0]
            model(x)
    finally:
        for h in handles:
            h.remove()
    return dead, sat


def _out_rms(model: nn.Module, batch: Any) -> dict[str, float]:
    """Plain torch, on one batch: the output rms of each module that has a weight."""
    out: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):

            def fn(_m, _i, y, name=name):  # type: ignore[no-untyped-def]
                if isinstance(y, torch.Tensor) and y.is_floating_point():
                    out[name] = float(y.float().pow(2).mean().sqrt())

            handles.append(module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            model(batch[0])
    finally:
        for h in handles:
            h.remove()
    return out


def run_case(
    case: Case, seed: int = 0, online: bool = False, diagnose: bool = True
) -> dict[str, Any]:
    """One case: trained for its steps under gs.watch (every step, the loss logged), with a
    plain-torch trace beside it; returns the record that is scored and saved."""
    setup = case.build(seed)
    model, opt = setup.model, setup.optimizer
    trace = Trace(norms={n: float(p.detach().norm()) for n, p in model.named_parameters()})
    trace.out_rms = _out_rms(model, setup.batches[0])
    fired: dict[str, int] = {}
    start = time.perf_counter()
    bad_after = None
    kwargs: dict[str, Any] = {}
    if online:
        kwargs["on_verdict"] = lambda v: fired.setdefault(v.id, rec.step_index)
    with gs.watch(model, optimizer=opt, every=1, **kwargs) as rec:
        for t, batch in enumerate(setup.batches):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = setup.step(model, opt, batch, t, lambda v: rec.log_scalar("loss", v))
            trace.losses.append(float(loss))
            trace.grads.append(
                {
                    n: (
                        float(torch.linalg.vector_norm(p.grad.double()))
                        if p.grad is not None
                        else None
                    )
                    for n, p in model.named_parameters()
                }
            )
            trace.moved.append(
                {n: float((p.detach() - before[n]).norm()) for n, p in model.named_parameters()}
            )
            if not math.isfinite(trace.losses[-1]) and bad_after is None:
                bad_after = t
            if bad_after is not None and t >= bad_after + 3:
                break  # a run gone non-finite stays so; a few steps show it
    seconds = time.perf_counter() - start
    trace.dead, trace.saturated = _probe(
        model, setup.batches[min(len(trace.losses), len(setup.batches)) - 1]
    )
    ok, why = case.check(trace)
    verdicts = rec.diagnose() if diagnose else []
    return {
        "name": case.name,
        "cause": case.cause,
        "expected": case.verdict,
        "layer": case.layer,
        "step": case.step,
        "split": case.split,
        "arch": case.arch,
        "note": case.note,
        "check_ok": ok,
        "check": why,
        "loss_event": trace.loss_event(),
        "losses": [round(v, 5) if math.isfinite(v) else str(v) for v in trace.losses],
        "verdicts": [
            {
                "id": v.id,
                "severity": v.severity,
                "message": v.message,
                "layers": list(v.layers[:5]),
                "first_step": v.first_step,
                "last_step": v.last_step,
            }
            for v in verdicts
        ],
        "online_fired": fired if online else None,
        "seconds": round(seconds, 2),
    }


def score(record: dict[str, Any]) -> dict[str, Any]:
    """The scores of one run (None where a score does not apply)."""
    verdicts = record["verdicts"]
    # the top verdict: the first that is not "ok" (a healthy headline may precede info)
    top = next(
        (v for v in verdicts if v["severity"] != "ok"),
        {"id": "healthy", "severity": "ok", "layers": []},
    )
    alarms = [v for v in verdicts if v["severity"] in ALARM]
    healthy = record["cause"] == "healthy"
    out: dict[str, Any] = {"top": top["id"], "top_layer": (top["layers"] or [None])[0]}
    if healthy:
        out["false_alarm"] = bool(alarms)
        return out
    detected = top["severity"] != "ok"
    out["detected"] = detected
    out["cause_first"] = detected and top["id"] == record["expected"]
    if record["layer"] is not None:
        out["layer_first"] = detected and _layer_matches(out["top_layer"], record["layer"])
    # detection: where the verdict naming the cause (else the top one) says it began
    named = next((v for v in verdicts if v["id"] == record["expected"]), top)
    first_alarm = named.get("first_step")
    out["detect_step"] = first_alarm
    if record["step"] is not None and first_alarm is not None:
        out["delay"] = first_alarm - record["step"]
    if record["loss_event"] is not None and first_alarm is not None:
        out["lead"] = record["loss_event"] - first_alarm
    if record.get("online_fired"):
        first_online = min(record["online_fired"].values())
        out["online_step"] = first_online
        if record["loss_event"] is not None:
            out["online_lead"] = record["loss_event"] - first_online
    return out


def _rate(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)}" if values else "-"


def table(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The per-class table (text) and the summary numbers."""
    scored = [(r, score(r)) for r in records if r["check_ok"]]
    by_class: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for r, s in scored:
        by_class[r["cause"]].append((r, s))
    lines = [
        f"{'class':<22} {'runs':>4} {'recall':>7} {'alarms':>7} {'cause 1st':>9} {'layer 1st':>9} "
        f"{'delay':>6} {'lead':>5}"
    ]
    for cause in sorted(by_class, key=lambda c: (c != "healthy", c)):
        rows = by_class[cause]
        ss = [s for _, s in rows]
        delay = [s["delay"] for s in ss if "delay" in s]
        lead = [s["lead"] for s in ss if "lead" in s]
        lines.append(
            f"{cause:<22} {len(rows):>4} "
            f"{_rate([s['detected'] for s in ss if 'detected' in s]):>7} "
            f"{_rate([s['false_alarm'] for s in ss if 'false_alarm' in s]):>7} "
            f"{_rate([s['cause_first'] for s in ss if s.get('detected')]):>9} "
            f"{_rate([s['layer_first'] for s in ss if 'layer_first' in s]):>9} "
            f"{(statistics.median(delay) if delay else '-'):>6} {(statistics.median(lead) if lead else '-'):>5}"
        )
    faults = [s for r, s in scored if r["cause"] != "healthy"]
    healthy = [s for r, s in scored if r["cause"] == "healthy"]
    detected = [s for s in faults if s["detected"]]
    with_layer = [s for s in faults if "layer_first" in s]
    leads = [s["lead"] for r, s in scored if r["cause"] in _DIVERGE and "lead" in s]
    summary = {
        "runs": len(records),
        "scored": len(scored),
        "check_failed": [r["name"] for r in records if not r["check_ok"]],
        "faulty": len(faults),
        "healthy": len(healthy),
        "recall": sum(s["detected"] for s in faults) / len(faults) if faults else None,
        "false_alarm_rate": sum(s["false_alarm"] for s in healthy) / len(healthy)
        if healthy
        else None,
        "cause_first": sum(s["cause_first"] for s in detected) / len(detected)
        if detected
        else None,
        "layer_first": sum(s["layer_first"] for s in with_layer) / len(with_layer)
        if with_layer
        else None,
        "median_lead_divergence": statistics.median(leads) if leads else None,
        "min_lead_divergence": min(leads) if leads else None,
    }
    online = [(r, s) for r, s in scored if r.get("online_fired") is not None]
    if online:
        online_leads = [
            s["online_lead"] for r, s in online if r["cause"] in _DIVERGE and "online_lead" in s
        ]
        summary["online_false_alarms"] = sum(
            bool(r["online_fired"]) for r, _ in online if r["cause"] == "healthy"
        )
        summary["online_recall"] = sum(
            bool(r["online_fired"]) for r, _ in online if r["cause"] != "healthy"
        ) / max(1, sum(r["cause"] != "healthy" for r, _ in online))
        summary["online_median_lead_divergence"] = (
            statistics.median(online_leads) if online_leads else None
        )
        summary["online_min_lead_divergence"] = min(online_leads) if online_leads else None
    lines.append(
        f"{'overall':<22} {len(scored):>4} {_rate([s['detected'] for s in faults]):>7} "
        f"{_rate([s['false_alarm'] for s in healthy]):>7} {_rate([s['cause_first'] for s in detected]):>9} "
        f"{_rate([s['layer_first'] for s in with_layer]):>9} {'':>6} "
        f"{(statistics.median(leads) if leads else '-'):>5}"
    )
    return "\n".join(lines), summary


_DIVERGE = ("lr_too_high", "lr_jump", "bad_batch", "post_ln_no_warmup")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["tune", "heldout", "blind", "all"], default="all")
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--online", action="store_true", help="also run on_verdict (slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="run the plain-torch checks only: no diagnosis is made or scored",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for c in CASES + BLIND if args.split in ("all", c.split)]
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, case in enumerate(cases, 1):
        try:
            record = run_case(case, args.seed, args.online, not args.check_only)
        except Exception as exc:  # one broken case is reported, the others go on
            print(f"[{i}/{len(cases)}] {case.name}: FAILED to run: {exc!r}", flush=True)
            continue
        records.append(record)
        (args.out / f"{case.name}.json").write_text(json.dumps(record, indent=1))
        s = score(record) if record["check_ok"] and not args.check_only else {}
        mark = "" if record["check_ok"] else "  (check failed: not scored)"
        print(
            f"[{i}/{len(cases)}] {case.name:<28} {case.split:<7} {record['seconds']:>5.1f}s "
            f"top={s.get('top', '-')}@{s.get('top_layer')} {record['check']}{mark}",
            flush=True,
        )
    if args.check_only:
        return
    splits = {"all": records}
    if args.split == "all":
        splits = {
            "tune": [r for r in records if r["split"] == "tune"],
            "heldout": [r for r in records if r["split"] == "heldout"],
            "blind": [r for r in records if r["split"] == "blind"],
            "tune+heldout": [r for r in records if r["split"] != "blind"],
        }
    summaries = {}
    for name, recs in splits.items():
        text, summary = table(recs)
        summaries[name] = summary
        print(f"\n== {name} ({len(recs)} runs) ==\n{text}")
        print(
            "recall {recall}, false alarms/healthy run {false_alarm_rate}, cause first {cause_first}, "
            "layer first {layer_first}, median lead (divergence, spikes) {median_lead_divergence} "
            "(min {min_lead_divergence}); check failed: {check_failed}".format(
                **{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in summary.items()}
            )
        )
        if "online_false_alarms" in summary:
            print(
                f"online (on_verdict): healthy runs with an alarm {summary['online_false_alarms']}, "
                f"faulty runs with an alarm {summary['online_recall']:.2f}, lead over the loss "
                f"event (divergence, spikes): median {summary['online_median_lead_divergence']}, "
                f"min {summary['online_min_lead_divergence']}"
            )
    if len(summaries) > 1:
        print("\n" + columns(summaries))
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))


def columns(summaries: dict[str, dict[str, Any]]) -> str:
    """The splits side by side: one column each (the blind set its own)."""

    def cell(s: dict[str, Any], key: str) -> str:
        v = s.get(key)
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    rows = [
        ("runs scored", "scored"),
        ("faulty", "faulty"),
        ("recall", "recall"),
        ("false alarms/healthy run", "false_alarm_rate"),
        ("cause first", "cause_first"),
        ("layer first", "layer_first"),
        ("median lead (divergence)", "median_lead_divergence"),
        ("online: healthy alarmed", "online_false_alarms"),
        ("online: faulty alarmed", "online_recall"),
    ]
    names = list(summaries)
    lines = [f"{'':<26}" + "".join(f"{n:>14}" for n in names)]
    for label, key in rows:
        lines.append(f"{label:<26}" + "".join(f"{cell(summaries[n], key):>14}" for n in names))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
