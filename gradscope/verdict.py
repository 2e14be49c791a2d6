"""One finding of the diagnosis: what, how bad, where, over which steps, the evidence."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("ok", "info", "warning", "error")


@dataclass(frozen=True)
class Verdict:
    """One finding: what, how bad, where, the measured numbers and what to do.

    `first_step` and `last_step` say over which recorded steps it holds.
    """

    id: str
    severity: str
    message: str
    suggestion: str
    layers: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    first_step: int | None = None
    last_step: int | None = None
    # the ids of the symptoms this root cause explains (gradscope.analysis.rank)
    explains: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"[{self.severity}] {self.id}: {self.message}"
        todo = self.suggestion
        return f"{text}. {todo[:1].upper()}{todo[1:]}" if todo else text


def fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 layer', '3 layers' (never 'layer(s)')."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def of_steps(x: float) -> str:
    """'every step', '62% of the steps'."""
    return "every step" if x >= 1.0 else f"{share(x)} of the steps"


def share(x: float) -> str:
    """A share in words a person reads at once: 'all', '93%', 'under 1%'."""
    if x >= 1.0:
        return "all"
    if 0 < x < 0.01:
        return "under 1%"
    return f"{x:.0%}"


class VerdictList(list[Verdict]):
    """A list of verdicts that shows itself as coloured lines in Jupyter."""

    def _repr_html_(self) -> str:
        # display only, when Jupyter asks: the HTML lives with the notebook integration
        from gradscope.integrations.notebook import verdicts_html

        return verdicts_html(self, shown=len(self))
