"""Gradients not zeroed between optimizer steps (a forgotten `zero_grad`).

One backward pass bounds a bias's gradient: it is the sum over the batch of the output
gradients, so |grad b| <= sum_i |g_i| <= |g|^2 / mean_i |g_i| (Cauchy-Schwarz), i.e.
kappa = |grad b| * sample_norm / norm^2 <= 1 for outputs of shape (batch, features); a few
times that for outputs with positions (sequences, images), summed before the bias. Summed
over k optimizer steps kappa grows with k. Accumulation over micro-batches within one step
adds the same micro-batches to both sides, so it stays under the bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradscope.analysis.view import RunView
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt, plural

# kappa above this bound (the healthy tuning runs peak at 1.15, a BatchNorm over images)...
KAPPA = 2.0
# ... and this many times its value over the first steps: it grows, as a running sum does.
KAPPA_GROWTH = 4.0
MIN_STEPS = 6
# The onset: the step from which kappa stays above this many times its first value (a running
# sum grows from the first step that was not zeroed, well before it crosses KAPPA).
ONSET_RISE = 1.5


def onset(k: pd.Series, crossed: int) -> int:
    """The first step from which `k` stays above ONSET_RISE x its first value up to the step
    where it `crossed` the bound."""
    upto = k[k.index <= crossed]
    low = upto[upto <= ONSET_RISE * float(upto.iloc[0])]
    after = upto.index[upto.index > low.index[-1]] if len(low) else upto.index
    return int(after[0]) if len(after) else crossed


def kappa(view: RunView) -> dict[str, pd.Series]:
    """Per module with a bias and recorded output gradients: kappa over the steps."""
    grads = view.grad
    norm = view.table(Kind.ACTIVATION_GRAD, Stat.NORM)
    sample = view.table(Kind.ACTIVATION_GRAD, Stat.SAMPLE_NORM)
    out = {}
    for param in grads.columns:
        if not str(param).endswith(".bias"):
            continue
        module = str(param)[: -len(".bias")]
        if module not in norm.columns or module not in sample.columns:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            k = grads[param] * sample[module] / norm[module] ** 2
        out[module] = k.replace([np.inf, -np.inf], np.nan)
    return out


def check(view: RunView) -> list[Verdict]:
    last = int(view.steps[-1]) if len(view.steps) else 0
    hits = {}
    for module, k in kappa(view).items():
        k = k.dropna()
        if len(k) < MIN_STEPS:
            continue
        start = float(k.iloc[:3].median())
        over = k[(k > KAPPA) & (k > KAPPA_GROWTH * max(start, 1e-12))]
        if len(over):
            hits[module] = (onset(k, int(over.index[0])), float(k.max()), start)
    if not hits:
        return []
    first = min(s for s, _, _ in hits.values())
    worst = max(hits, key=lambda m: hits[m][1])
    return [
        Verdict(
            VerdictId.GRADIENTS_NOT_ZEROED,
            Severity.ERROR,
            f"gradients grow from step {first} on until they are larger than one backward "
            f"pass can make (in {plural(len(hits), 'layer')}; {worst}: {fmt(hits[worst][1])} "
            "times the bound): they are summed over optimizer steps, not zeroed",
            "call optimizer.zero_grad() (or model.zero_grad()) once per optimizer step; "
            "to accumulate over micro-batches, zero after each optimizer.step()",
            sorted(hits, key=lambda m: hits[m][0]),
            {
                "kappa_max": {m: h[1] for m, h in hits.items()},
                "kappa_start": {m: h[2] for m, h in hits.items()},
            },
            KAPPA,
            first,
            last,
        )
    ]
