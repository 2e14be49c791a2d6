"""Where verdicts sit on a page: under "What is wrong" only when something is, each with its
layers and evidence in words (lists and per-layer numbers included, not dropped)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from typing import Any

from gradscope.analysis.render import headline
from gradscope.verdict import SEVERITIES, Verdict

SHOWN = 5  # items of a list or per-layer dict written out before "and N more"


def as_verdict(v: Verdict | Mapping[str, Any]) -> Verdict:
    """A Verdict from itself or from its saved dict (run.json, a sweep run's details)."""
    return v if isinstance(v, Verdict) else Verdict(**dict(v))


def worst_severity(verdicts: Iterable[Verdict]) -> str:
    return max((v.severity for v in verdicts), key=SEVERITIES.index, default="ok")


def heading(verdicts: list[Verdict]) -> str:
    """The section's title: "What is wrong" only above a warning or an error."""
    worst = worst_severity(verdicts)
    if worst in ("warning", "error"):
        return "What is wrong"
    return "Verdicts: nothing wrong found" if verdicts else "Verdicts"


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if math.isfinite(x) else str(x)
    if isinstance(x, Mapping):
        items = [f"{k}: {_value(v)}" for k, v in list(x.items())[:SHOWN]]
        more = f", and {len(x) - SHOWN} more" if len(x) > SHOWN else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(x, list | tuple):
        items = [_value(v) for v in list(x)[:SHOWN]]
        more = f", and {len(x) - SHOWN} more" if len(x) > SHOWN else ""
        return "[" + ", ".join(items) + more + "]"
    return str(x)


def evidence_text(v: Verdict) -> str:
    """The measured numbers behind a verdict, lists and per-layer values included.

    The rule's threshold is not repeated: the message states the cut-off it applies (a
    separate number beside it read as a second, different cut-off).
    """
    return "; ".join(f"{k} = {_value(x)}" for k, x in v.evidence.items())


def verdict_html(v: Verdict | Mapping[str, Any], where: str = "") -> str:
    """One verdict as a paragraph, coloured by severity: its headline (gradscope.analysis's
    renderer, as in the CLI), what to do, the symptoms it explains, and its evidence."""
    v = as_verdict(v)
    sev = html.escape(v.severity)
    prefix = f"<b>{html.escape(where)}</b> " if where else ""
    todo = v.suggestion.rstrip(".")
    todo = f" {html.escape(todo[:1].upper() + todo[1:])}." if todo else ""
    explains = ", ".join(dict.fromkeys(v.explains))
    also = f" <small>Also explains: {html.escape(explains)}.</small>" if explains else ""
    evidence = evidence_text(v)
    small = f" <small>Evidence: {html.escape(evidence)}</small>" if evidence else ""
    return (
        f'<p class="verdict sev-{sev}">{prefix}{html.escape(headline(v).rstrip("."))}.'
        f"{todo}{also}{small}</p>"
    )


def verdicts_html(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> str:
    """Every verdict, worst first."""
    found = sorted((as_verdict(v) for v in verdicts), key=lambda v: -SEVERITIES.index(v.severity))
    return "\n".join(verdict_html(v) for v in found) or "<p>No verdicts: nothing was recorded.</p>"
