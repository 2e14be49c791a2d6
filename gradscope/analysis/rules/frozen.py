"""A layer frozen by mistake: parameters with requires_grad=False between parameters that
train (the recorder's model summary lists the frozen ones; a frozen prefix, an embedding or a
backbone, is a common intent and left to `no_gradient`'s info)."""

from __future__ import annotations

from gradscope.analysis.view import RunView, module_of
from gradscope.schema import Severity, VerdictId
from gradscope.verdict import Verdict, plural

# Frozen stretches between trainable parameters (in parameter order) that read as a mistake;
# more of them are a pattern someone chose (LoRA's frozen base weights, BitFit's frozen
# weights between trained biases, every BatchNorm frozen), named as info.
MAX_STRETCHES = 2


def stretches(positions: list[int]) -> list[list[int]]:
    """Runs of consecutive positions, as lists of indices into `positions`."""
    out: list[list[int]] = []
    for i, p in enumerate(positions):
        if out and positions[out[-1][-1]] == p - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def check(view: RunView) -> list[Verdict]:
    frozen = view.model.get("frozen") or {}
    names, positions, total = (
        frozen.get("names", []),
        frozen.get("positions", []),
        frozen.get("of", 0),
    )
    if not names or len(names) != len(positions) or len(view.steps) == 0:
        return []
    first, last = int(view.steps[0]), int(view.steps[-1])
    inner = [
        r for r in stretches(positions) if positions[r[0]] > 0 and positions[r[-1]] < total - 1
    ]
    if not inner:
        return []
    params = [names[i] for r in inner for i in r]
    modules = list(dict.fromkeys(module_of(p) for p in params))
    evidence = {"frozen": params, "stretches": len(inner), "parameters": total}
    if len(inner) > MAX_STRETCHES:
        return [
            Verdict(
                VerdictId.NO_GRADIENT,
                Severity.INFO,
                f"{plural(len(params), 'parameter')} are frozen (requires_grad=False) in "
                f"{len(inner)} stretches between parameters that train (a pattern such as "
                "LoRA or BitFit)",
                "fine if chosen; otherwise set requires_grad_(True) on them",
                modules,
                evidence,
                float(MAX_STRETCHES),
                first,
                last,
            )
        ]
    shown = ", ".join(params[:3]) + (f" and {len(params) - 3} more" if len(params) > 3 else "")
    return [
        Verdict(
            VerdictId.NO_GRADIENT,
            Severity.WARNING,
            f"{shown} {'is' if len(params) == 1 else 'are'} frozen (requires_grad=False) while "
            "the layers before and after train: a layer frozen in the middle of the network is "
            "rarely intended",
            "call requires_grad_(True) on them (and add them to the optimizer); freeze a prefix "
            "(embedding, backbone) instead if fine-tuning was the intent",
            modules,
            evidence,
            float(MAX_STRETCHES),
            first,
            last,
        )
    ]
