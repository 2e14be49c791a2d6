"""A verdict in words: the one renderer the CLI, the run report and the sweep report use."""

from __future__ import annotations

from gradscope.verdict import Verdict


def steps(v: Verdict) -> str:
    """'step 30', 'steps 0 to 59', or '' for verdicts saved without steps."""
    if v.first_step is None or v.last_step is None:
        return ""
    if v.first_step == v.last_step:
        return f"step {v.first_step}"
    return f"steps {v.first_step} to {v.last_step}"


def where(v: Verdict, limit: int = 3) -> str:
    if not v.layers:
        return ""
    shown = ", ".join(v.layers[:limit])
    more = len(v.layers) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def headline(v: Verdict) -> str:
    """One line: '[error] vanishing_gradients (steps 0 to 59; in 0, 2): message'."""
    context = "; ".join(x for x in (steps(v), f"in {where(v)}" if v.layers else "") if x)
    return f"[{v.severity}] {v.id}" + (f" ({context})" if context else "") + f": {v.message}"


def render(v: Verdict) -> str:
    """The headline, what to do, and the symptoms it explains, as plain text lines."""
    lines = [headline(v)]
    if v.suggestion:
        lines.append(f"  what to do: {v.suggestion}")
    if v.explains:
        lines.append(f"  also explains: {', '.join(dict.fromkeys(v.explains))}")
    return "\n".join(lines)
