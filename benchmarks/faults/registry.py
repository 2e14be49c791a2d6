"""The labelled fault benchmark's runs: each a `Case` that builds a short CPU training run with
one injected fault (or none), labelled by what was injected, never by what a tool says.

Stable API (the remedies benchmark reruns the same cases):

    from benchmarks.faults.registry import CASES, Case, Setup, by_name
    case = by_name("lr_jump_mlp")
    setup = case.build(0)                 # seed -> Setup (fresh model, optimizer, batches)
    for t, batch in enumerate(setup.batches):
        loss = setup.step(setup.model, setup.optimizer, batch, t, log=lambda loss: None)

- `Case.name`: unique id; `Case.cause`: the fault class ("healthy" for controls, see
  `CAUSES`); `Case.verdict`: the gradscope VerdictId that names it (None for healthy);
  `Case.layer`: the fqn where the fault was put (a module or parameter prefix), or None;
  `Case.step`: the step it was injected at (None: from the start); `Case.split`: "tune"
  (rules may be tuned on it) or "heldout" (never looked at while tuning); `Case.arch`,
  `Case.note`: words for the table; `Case.check`: the plain-torch check (no gradscope) that
  the fault is really there, or that a healthy run really trains: Trace -> (ok, why).
- `Setup.step(model, optimizer, batch, t, log)` runs one optimizer step (including zero_grad,
  backward, clipping, schedules as the case does them) and returns the loss as a float
  tensor; it calls `log(loss)` before `optimizer.step()` so a recorder can log it. It may
  skip `optimizer.step()` entirely only where the case says so (never in this registry).
- `Setup.batches`: a list, re-iterable; `Setup.steps == len(batches)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradscope.lab.data import DataError, Dataset, load_dataset, subset, synthetic

STEPS = 60
EVENT = 30  # the step where mid-run faults are injected
Log = Callable[[torch.Tensor], None]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Any, int, Log], torch.Tensor]

CAUSES = {
    # fault class: the VerdictId that names it
    "vanishing": "vanishing_gradients",
    "exploding": "exploding_gradients",
    "lr_too_high": "lr_too_high",
    "lr_jump": "lr_too_high",
    "bad_batch": "gradient_spike",
    "nonfinite_forward": "nonfinite_forward",
    "nonfinite_backward": "nonfinite_backward",
    "dead_units": "dead_units",
    "saturation": "saturated_units",
    "unnormalized_inputs": "unnormalized_inputs",
    "frozen_or_detached": "no_gradient",
    "not_in_optimizer": "not_in_optimizer",
    "zero_grad_forgotten": "gradients_not_zeroed",
    "lr_zero": "no_updates",
    "post_ln_no_warmup": "lr_too_high",
}


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: StepFn
    batches: list[Any]

    @property
    def steps(self) -> int:
        return len(self.batches)


@dataclass
class Trace:
    """What a run showed, measured in plain torch (no gradscope): per step the loss, the
    gradient norm of each parameter (None: no gradient), and how far each parameter moved."""

    losses: list[float] = field(default_factory=list)
    grads: list[dict[str, float | None]] = field(default_factory=list)
    moved: list[dict[str, float]] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)  # each parameter's norm at the start
    out_rms: dict[str, float] = field(default_factory=dict)  # each weighted module, batch 0
    # after the run, on the last batch: per activation module, the share of its units
    # (features, or channels) zero for every sample, and of outputs at a bound (tanh, sigmoid)
    dead: dict[str, float] = field(default_factory=dict)
    saturated: dict[str, float] = field(default_factory=dict)

    def loss_event(self) -> int | None:
        """The first step whose loss is non-finite or 5x the median of the (up to 20) steps
        before it."""
        for t, loss in enumerate(self.losses):
            if not math.isfinite(loss):
                return t
            if t >= 1 and loss > 5 * float(torch.tensor(self.losses[max(0, t - 20) : t]).median()):
                return t
        return None

    def first_nonfinite_grad(self) -> int | None:
        for t, g in enumerate(self.grads):
            if any(v is not None and not math.isfinite(v) for v in g.values()):
                return t
        return None

    def grad(self, prefix: str, t: int) -> float:
        vals = [v for k, v in self.grads[t].items() if k.startswith(prefix) and v is not None]
        return math.sqrt(sum(v * v for v in vals)) if vals else 0.0

    def total_moved(self, prefix: str) -> float:
        return sum(v for m in self.moved for k, v in m.items() if k.startswith(prefix))


Check = Callable[[Trace], tuple[bool, str]]


@dataclass(frozen=True)
class Case:
    name: str
    cause: str
    build: Callable[[int], Setup]
    check: Check
    arch: str
    layer: str | None = None
    step: int | None = None
    split: str = "tune"
    note: str = ""

    @property
    def verdict(self) -> str | None:
        return CAUSES.get(self.cause)

    @property
    def healthy(self) -> bool:
        return self.cause == "healthy"


# -- data ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist() -> Dataset:
    try:
        return subset(load_dataset("mnist"), 4096, seed=0)
    except DataError:  # the benchmark still runs, on the synthetic digits
        return synthetic(4096, 256)


def _digits(seed: int, batch: int = 64, steps: int = STEPS, size: int = 4096) -> list[Any]:
    data = _mnist()
    g = torch.Generator().manual_seed(seed)
    n = min(size, len(data.y_train))
    out = []
    for _ in range(steps):
        i = torch.randint(0, n, (batch,), generator=g)
        out.append((data.x_train[i], data.y_train[i]))
    return out


def _synthetic(seed: int, batch: int = 64, steps: int = STEPS, dim: int = 32) -> list[Any]:
    g = torch.Generator().manual_seed(1000 + seed)
    proto = torch.randn(10, dim, generator=g)
    out = []
    for _ in range(steps):
        y = torch.randint(0, 10, (batch,), generator=g)
        out.append((proto[y] + 0.5 * torch.randn(batch, dim, generator=g), y))
    return out


def _tokens(seed: int, batch: int = 32, steps: int = STEPS, length: int = 8) -> list[Any]:
    """A token task: the class of a sequence is its first token."""
    g = torch.Generator().manual_seed(2000 + seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 16, (batch, length), generator=g)
        out.append((ids, ids[:, 0]))
    return out


def _chars(seed: int, batch: int = 32, steps: int = STEPS, length: int = 12) -> list[Any]:
    """A character task: predict the next symbol of a noisy cyclic sequence (vocab 12)."""
    g = torch.Generator().manual_seed(3000 + seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, 12, (batch, 1), generator=g)
        seq = (start + torch.arange(length + 1)) % 12
        noise = torch.rand(batch, length + 1, generator=g) < 0.1
        seq = torch.where(noise, torch.randint(0, 12, seq.shape, generator=g), seq)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


# -- models --------------------------------------------------------------------------------


class MLP(nn.Sequential):
    def __init__(
        self,
        sizes: list[int],
        act: Callable[[], nn.Module] = nn.ReLU,
        gain: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            lin = nn.Linear(a, b, bias=bias)
            if gain is not None:
                nn.init.normal_(lin.weight, 0.0, gain / math.sqrt(a))
            layers.append(lin)
            if i < len(sizes) - 2:
                layers.append(act())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class CNN(nn.Module):
    """conv-BN-ReLU-maxpool x2 on 28x28 digits, then a linear head."""

    def __init__(self, dropout: float = 0.0, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.drop(x.flatten(1)))


class StdPoolCNN(nn.Module):
    """conv-ReLU-conv (no padding) then the spatial std of each channel (sqrt of a variance:
    its backward is 0/0 where a channel is constant) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.std = StdPool()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu1(self.conv1(x.reshape(-1, 1, 28, 28))))
        return self.fc(self.std(x))


class StdPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = (x - x.mean((2, 3), keepdim=True)).pow(2).mean((2, 3))
        return torch.sqrt(var)


class NormFeature(nn.Module):
    """Appends each sample's L2 norm as a feature (no epsilon: its backward is 0/0 at 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.pow(2).sum(1, keepdim=True).sqrt()], 1)


class NanAt(nn.Module):
    """A layer whose forward makes NaN on one step (a log of a negative, emulated)."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.training and torch.is_grad_enabled():  # (probes run under no_grad)
            self.calls += 1
            if self.calls == self.at + 1:
                y = torch.log(y - y.detach().max() - 1.0)  # log of negatives: NaN
        return y


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


class ResMLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[Residual(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


class TinyTransformer(nn.Module):
    def __init__(self, layers: int = 2, d: int = 32, norm_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.1)
        layer = nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos[: ids.shape[1]])
        return self.head(h[:, 0])


class CharRNN(nn.Module):
    def __init__(self, cell: str = "lstm", hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 16)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


# -- steps ---------------------------------------------------------------------------------


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def plain_step(
    clip: float | None = None,
    sched: Callable[[torch.optim.Optimizer], Any] | None = None,
    zero_grad: bool = True,
    lr_jump: tuple[int, float] | None = None,
    autocast: bool = False,
) -> StepFn:
    """zero_grad, forward, cross-entropy, backward, (clip), step, (schedule)."""
    state: dict[str, Any] = {}

    def step(
        model: nn.Module, opt: torch.optim.Optimizer, batch: Any, t: int, log: Log
    ) -> torch.Tensor:
        if sched is not None and "sched" not in state:
            state["sched"] = sched(opt)
        if lr_jump is not None and t == lr_jump[0]:
            for group in opt.param_groups:
                group["lr"] *= lr_jump[1]
        x, y = batch
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = _ce(out.float(), y)
        else:
            loss = _ce(model(x), y)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        log(loss)
        opt.step()
        if "sched" in state:
            state["sched"].step()
        return loss.detach()

    return step


def accumulate_step(micro: int) -> StepFn:
    """Intentional accumulation: `micro` micro-batches summed, one optimizer step, zeroed."""

    def step(
        model: nn.Module, opt: torch.optim.Optimizer, batch: Any, t: int, log: Log
    ) -> torch.Tensor:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            loss = _ce(model(xs), ys) / micro
            loss.backward()
            total += loss.detach()
        log(total)
        opt.step()
        return total

    return step


def detached_step(cut: int) -> StepFn:
    """A detached graph by mistake: the output of module `cut` is detached."""

    def step(
        model: nn.Module, opt: torch.optim.Optimizer, batch: Any, t: int, log: Log
    ) -> torch.Tensor:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        assert isinstance(model, nn.Sequential)
        h = x
        for i, module in enumerate(model):
            h = module(h)
            if i == cut:
                h = h.detach()
        loss = _ce(h, y)
        loss.backward()
        log(loss)
        opt.step()
        return loss.detach()

    return step


# -- checks (plain torch, no gradscope) ----------------------------------------------------


def trains(drop: float = 0.85) -> Check:
    """A healthy run trains: the mean loss of the last 10 steps under `drop` x the first 10."""

    def check(tr: Trace) -> tuple[bool, str]:
        head, tail = tr.losses[:10], tr.losses[-10:]
        if not all(math.isfinite(v) for v in tr.losses):
            return False, "loss went non-finite"
        a, b = sum(head) / len(head), sum(tail) / len(tail)
        return b < drop * a, f"loss {a:.3g} -> {b:.3g}"

    return check


def grad_ratio(below: float | None = None, above: float | None = None) -> Check:
    """The median over the first 5 steps of |grad of the first weight| / |grad of the last
    weight| (by parameter order) is below/above a bound."""

    def check(tr: Trace) -> tuple[bool, str]:
        names = [k for k in tr.grads[0] if k.endswith("weight")]
        first, last = names[0], names[-1]
        ratios = sorted(
            (tr.grads[t][first] or 0.0) / max(tr.grads[t][last] or 0.0, 1e-300) for t in range(5)
        )
        med = ratios[len(ratios) // 2]
        ok = (below is None or med < below) and (above is None or med > above)
        return ok, f"first/last gradient ratio {med:.3g}"

    return check


def input_scale(module: str, above: float = 10.0) -> Check:
    """The module's outputs on the first batch have rms above `above` (a default-init layer
    fed unit-scale inputs gives about 0.6)."""

    def check(tr: Trace) -> tuple[bool, str]:
        rms = tr.out_rms.get(module, 0.0)
        return rms > above, f"{module}: output rms {rms:.3g} at step 0"

    return check


def diverges(after: int = 0) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        ev = tr.loss_event()
        return ev is not None and ev >= after, f"loss event at {ev}"

    return check


def nonfinite_at(step: int) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        t = tr.first_nonfinite_grad()
        finite_loss = math.isfinite(tr.losses[step]) if len(tr.losses) > step else False
        return t == step, f"first non-finite gradient at {t} (loss finite there: {finite_loss})"

    return check


def no_grad_for(prefix: str) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        got = [
            g for t in range(len(tr.grads)) for k, g in tr.grads[t].items() if k.startswith(prefix)
        ]
        none = all(g is None or g == 0 for g in got)
        return none and tr.total_moved(
            prefix
        ) == 0, f"{prefix}: gradients {'none' if none else 'present'}"

    return check


def never_moves(prefix: str) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        has_grad = any(tr.grad(prefix, t) > 0 for t in range(len(tr.grads)))
        moved = tr.total_moved(prefix)
        return has_grad and moved == 0, f"{prefix}: has gradient {has_grad}, moved {moved:.3g}"

    return check


def grad_grows(factor: float = 4.0) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        a, b = tr.grad("", 1), tr.grad("", len(tr.grads) - 1)
        return b > factor * a, f"total gradient norm {a:.3g} -> {b:.3g}"

    return check


def both(*checks: Check) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        results = [c(tr) for c in checks]
        return all(ok for ok, _ in results), "; ".join(why for _, why in results)

    return check


def not_training(drop: float = 0.9) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        ok, why = trains(drop)(tr)
        return not ok, why

    return check


def dead_in(module: str, above: float = 0.5) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        share = tr.dead.get(module, 0.0)
        return share > above, f"{module}: {share:.0%} of units zero for the whole batch"

    return check


def saturated_in(module: str, above: float = 0.5) -> Check:
    def check(tr: Trace) -> tuple[bool, str]:
        share = tr.saturated.get(module, 0.0)
        return share > above, f"{module}: {share:.0%} of outputs at a bound"

    return check


# -- the cases -----------------------------------------------------------------------------


def _sgd(lr: float, momentum: float = 0.9) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def _adam(lr: float, wd: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    if wd:
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return lambda params: torch.optim.Adam(params, lr=lr)


def _setup(
    model: Callable[[], nn.Module],
    opt: Callable[[Any], torch.optim.Optimizer],
    data: Callable[[int], list[Any]],
    step: Callable[[], StepFn] = plain_step,
    params: Callable[[nn.Module], Any] | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    batches: Callable[[list[Any]], list[Any]] | None = None,
) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        m = model()
        if prepare is not None:
            prepare(m)
        chosen = params(m) if params is not None else [p for p in m.parameters() if p.requires_grad]
        b = data(seed)
        if batches is not None:
            b = batches(b)
        return Setup(m, opt(chosen), step(), b)

    return build


def _scale_batch(at: int, factor: float) -> Callable[[list[Any]], list[Any]]:
    def change(b: list[Any]) -> list[Any]:
        x, y = b[at]
        b[at] = (x * factor, y)
        return b

    return change


def _zero_sample(at: int) -> Callable[[list[Any]], list[Any]]:
    def change(b: list[Any]) -> list[Any]:
        x, y = b[at]
        x = x.clone()
        x[0] = 0.0
        b[at] = (x, y)
        return b

    return change


def _noisy_labels(b: list[Any]) -> list[Any]:
    g = torch.Generator().manual_seed(7)
    out = []
    for x, y in b:
        flip = torch.rand(len(y), generator=g) < 0.5
        out.append((x, torch.where(flip, torch.randint(0, 10, y.shape, generator=g), y)))
    return out


def _raw_pixels(b: list[Any]) -> list[Any]:
    # undo gradscope.lab.data's MNIST normalization: pixel values 0..255
    return [((x * 0.3081 + 0.1307) * 255.0, y) for x, y in b]


def _offset_scale(b: list[Any]) -> list[Any]:
    return [(x * 100.0 + 50.0, y) for x, y in b]


def _freeze(prefix: str) -> Callable[[nn.Module], None]:
    def prepare(m: nn.Module) -> None:
        for name, p in m.named_parameters():
            if name.startswith(prefix):
                p.requires_grad_(False)

    return prepare


def _bias(module: str, value: float) -> Callable[[nn.Module], None]:
    def prepare(m: nn.Module) -> None:
        with torch.no_grad():
            m.get_submodule(module).bias.fill_(value)  # type: ignore[union-attr, operator]

    return prepare


def _wrap_nan(module: str) -> Callable[[nn.Module], None]:
    def prepare(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            m[int(module)] = NanAt(m[int(module)], EVENT)
        else:
            setattr(m, module, NanAt(getattr(m, module), EVENT))

    return prepare


def _without(prefix: str) -> Callable[[nn.Module], Any]:
    return lambda m: [p for n, p in m.named_parameters() if not n.startswith(prefix)]


def _warmup(steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / steps))


def _mlp(*sizes: int, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: MLP(list(sizes), **kw)


def _depth(d_in: int, width: int, depth: int, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: MLP([d_in] + [width] * depth + [10], **kw)


DIG = [784, 64, 64, 10]


def _norm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 64, bias=False),
        NormFeature(),
        nn.Linear(65, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _cases() -> list[Case]:
    E = EVENT
    h = "healthy"
    cases = [
        # ---- healthy controls that a naive rule would flag ----
        Case(
            "h_mlp_relu_sgd",
            h,
            _setup(_mlp(*DIG), _sgd(0.05), _digits),
            trains(),
            "MLP",
            note="ReLU: most outputs exactly zero",
        ),
        Case(
            "h_mlp_relu_adam_synth",
            h,
            _setup(_mlp(32, 64, 64, 10), _adam(1e-3), _synthetic),
            trains(),
            "MLP",
            split="heldout",
        ),
        Case(
            "h_cnn_bn_pool_sgd",
            h,
            _setup(CNN, _sgd(0.05), lambda s: _digits(s, 32)),
            trains(),
            "CNN",
            note="max-pool, BatchNorm",
        ),
        Case(
            "h_cnn_dropout_adam",
            h,
            _setup(lambda: CNN(0.3), _adam(1e-3), lambda s: _digits(s, 32)),
            trains(),
            "CNN",
            split="heldout",
            note="dropout",
        ),
        Case(
            "h_mlp_label_noise",
            h,
            _setup(_mlp(*DIG), _sgd(0.05), _digits, batches=_noisy_labels),
            trains(0.95),
            "MLP",
            note="half the labels random",
        ),
        Case(
            "h_mlp_plateau_steplr",
            h,
            _setup(
                _mlp(32, 64, 10),
                _adam(3e-3),
                _synthetic,
                step=lambda: plain_step(
                    sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.1)
                ),
            ),
            trains(),
            "MLP",
            split="heldout",
            note="StepLR: plateaus",
        ),
        Case(
            "h_mlp_small_noisy_batch",
            h,
            _setup(_mlp(*DIG), _sgd(0.02), lambda s: _digits(s, 4)),
            trains(0.95),
            "MLP",
            note="batch 4",
        ),
        Case(
            "h_transformer_warmup",
            h,
            _setup(
                TinyTransformer,
                _adam(3e-3, 0.01),
                _tokens,
                step=lambda: plain_step(sched=_warmup(20)),
            ),
            trains(0.97),
            "transformer",
            split="heldout",
            note="AdamW, linear warm-up",
        ),
        Case(
            "h_frozen_backbone",
            h,
            _setup(_mlp(*DIG), _sgd(0.05), _digits, prepare=_freeze("0.")),
            trains(),
            "MLP",
            note="first layer frozen on purpose (fine-tune)",
        ),
        Case(
            "h_grad_accumulation",
            h,
            _setup(_mlp(*DIG), _sgd(0.05), _digits, step=lambda: accumulate_step(4)),
            trains(),
            "MLP",
            split="heldout",
            note="4 micro-batches per step",
        ),
        Case(
            "h_bf16_autocast",
            h,
            _setup(_mlp(*DIG), _sgd(0.05), _digits, step=lambda: plain_step(autocast=True)),
            trains(),
            "MLP",
            note="CPU bf16 autocast",
        ),
        Case(
            "h_lstm_adam",
            h,
            _setup(lambda: CharRNN("lstm"), _adam(1e-2), _chars),
            trains(),
            "LSTM",
            split="heldout",
        ),
        Case(
            "h_gru_clip_sgd",
            h,
            _setup(lambda: CharRNN("gru"), _sgd(0.5), _chars, step=lambda: plain_step(clip=1.0)),
            trains(0.95),
            "GRU",
            note="clipped at 1.0",
        ),
        Case(
            "h_resmlp_deep",
            h,
            _setup(lambda: ResMLP(784, 64, 12), _adam(1e-3), _digits),
            trains(),
            "ResMLP",
            split="heldout",
            note="12 Pre-LN residual blocks",
        ),
        Case(
            "h_tanh_mlp",
            h,
            _setup(_mlp(*DIG, act=nn.Tanh, gain=1.0), _sgd(0.05), _digits),
            trains(),
            "MLP",
            note="tanh",
        ),
        Case(
            "h_onecycle",
            h,
            _setup(
                _mlp(*DIG),
                _sgd(0.05),
                _digits,
                step=lambda: plain_step(
                    sched=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.2, total_steps=STEPS)
                ),
            ),
            trains(),
            "MLP",
            split="heldout",
            note="OneCycle: LR rises 8x then falls",
        ),
        Case(
            "h_cnn_adamw_cosine",
            h,
            _setup(
                CNN,
                _adam(2e-3, 0.05),
                lambda s: _digits(s, 32),
                step=lambda: plain_step(
                    sched=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, STEPS)
                ),
            ),
            trains(),
            "CNN",
            note="AdamW, cosine",
        ),
        Case(
            "h_transformer_preln_adam",
            h,
            _setup(TinyTransformer, _adam(1e-3), _tokens),
            trains(0.97),
            "transformer",
            split="heldout",
        ),
        Case(
            "h_mlp_relu_deep6",
            h,
            _setup(_depth(784, 64, 6, gain=math.sqrt(2)), _sgd(0.02), _digits),
            trains(),
            "MLP",
            note="6 ReLU layers, kaiming",
        ),
        Case(
            "h_mlp_dropout_sgd",
            h,
            _setup(_mlp(*DIG, dropout=0.5), _sgd(0.05), _digits),
            trains(),
            "MLP",
            split="heldout",
            note="dropout 0.5",
        ),
        # ---- faults, each labelled by what was injected ----
        Case(
            "vanishing_init",
            "vanishing",
            _setup(_depth(784, 64, 10, act=nn.Tanh, gain=0.3), _sgd(0.05), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
            note="tanh x10, init gain 0.3",
        ),
        Case(
            "vanishing_sigmoid",
            "vanishing",
            _setup(_depth(784, 64, 10, act=nn.Sigmoid, gain=1.0), _sgd(0.05), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
            split="heldout",
            note="sigmoid x10",
        ),
        Case(
            "vanishing_depth",
            "vanishing",
            _setup(_depth(784, 32, 30), _sgd(0.05), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
            note="ReLU x30, default init",
        ),
        Case(
            "vanishing_depth_tanh",
            "vanishing",
            _setup(_depth(784, 32, 24, act=nn.Tanh), _adam(1e-3), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
            split="heldout",
            note="tanh x24, default init, Adam",
        ),
        Case(
            "exploding_init",
            "exploding",
            _setup(_depth(784, 64, 12, act=nn.Tanh, gain=2.5), _adam(1e-3), _digits),
            grad_ratio(above=30),
            "MLP",
            layer="0",
            split="heldout",
            note="tanh x12, gain 2.5, Adam",
        ),
        Case(
            "exploding_tanh",
            "exploding",
            _setup(_depth(784, 64, 10, act=nn.Tanh, gain=3.0), _sgd(0.01), _digits),
            grad_ratio(above=30),
            "MLP",
            layer="0",
            note="tanh x10, gain 3",
        ),
        Case(
            "exploding_depth",
            "exploding",
            _setup(_depth(784, 32, 20, act=nn.Tanh, gain=2.0), _sgd(0.01), _digits),
            grad_ratio(above=30),
            "MLP",
            layer="0",
            split="heldout",
            note="tanh x20, gain 2",
        ),
        Case(
            "lr_high_sgd",
            "lr_too_high",
            _setup(_mlp(*DIG), _sgd(3.0), _digits),
            diverges(),
            "MLP",
            note="SGD lr 3",
        ),
        Case(
            "lr_high_adam_transformer",
            "lr_too_high",
            _setup(TinyTransformer, _adam(0.5), _tokens),
            diverges(),
            "transformer",
            split="heldout",
            note="Adam lr 0.5",
        ),
        Case(
            "lr_high_cnn",
            "lr_too_high",
            _setup(lambda: CNN(bn=False), _sgd(10.0), lambda s: _digits(s, 32)),
            diverges(),
            "CNN",
            split="heldout",
            note="no BN, SGD lr 10",
        ),
        Case(
            "lr_jump_mlp",
            "lr_jump",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, step=lambda: plain_step(lr_jump=(E, 100.0))),
            diverges(E),
            "MLP",
            step=E,
            note="lr x100 at step 30",
        ),
        Case(
            "lr_jump_lstm",
            "lr_jump",
            _setup(
                lambda: CharRNN("lstm"),
                _adam(3e-3),
                _chars,
                step=lambda: plain_step(lr_jump=(E, 1000.0)),
            ),
            diverges(E),
            "LSTM",
            step=E,
            split="heldout",
            note="Adam lr x1000 at step 30",
        ),
        Case(
            "lr_jump_resmlp",
            "lr_jump",
            _setup(
                lambda: ResMLP(784, 64, 6),
                _sgd(0.05),
                _digits,
                step=lambda: plain_step(lr_jump=(E, 200.0)),
            ),
            diverges(E),
            "ResMLP",
            step=E,
            split="heldout",
            note="lr x200 at step 30",
        ),
        Case(
            "bad_batch_mlp",
            "bad_batch",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, batches=_scale_batch(E, 1e3)),
            diverges(E),
            "MLP",
            step=E,
            note="inputs x1e3 on one batch",
        ),
        Case(
            "bad_batch_synth_adam",
            "bad_batch",
            _setup(_mlp(32, 64, 64, 10), _adam(1e-3), _synthetic, batches=_scale_batch(E, 1e4)),
            diverges(E),
            "MLP",
            step=E,
            split="heldout",
            note="inputs x1e4 on one batch, Adam",
        ),
        Case(
            "nan_forward_mlp",
            "nonfinite_forward",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, prepare=_wrap_nan("2")),
            nonfinite_at(E),
            "MLP",
            layer="2",
            step=E,
            note="log of negatives in layer 2",
        ),
        Case(
            "nan_forward_cnn",
            "nonfinite_forward",
            _setup(CNN, _adam(1e-3), lambda s: _digits(s, 32), prepare=_wrap_nan("conv2")),
            nonfinite_at(E),
            "CNN",
            layer="conv2",
            step=E,
            split="heldout",
            note="log of negatives in conv2",
        ),
        Case(
            "nan_backward_norm",
            "nonfinite_backward",
            _setup(_norm_mlp, _sgd(0.05), _digits, batches=_zero_sample(E)),
            nonfinite_at(E),
            "MLP",
            layer="1",
            step=E,
            note="sqrt at 0 (a norm feature, an all-zero sample)",
        ),
        Case(
            "nan_backward_std",
            "nonfinite_backward",
            _setup(StdPoolCNN, _adam(1e-3), lambda s: _digits(s, 16), batches=_zero_sample(E)),
            nonfinite_at(E),
            "CNN",
            layer="std",
            step=E,
            split="heldout",
            note="sqrt of a zero variance",
        ),
        Case(
            "dead_bias_mlp",
            "dead_units",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, prepare=_bias("2", -5.0)),
            dead_in("3"),
            "MLP",
            layer="3",
            note="layer 2's bias at -5",
        ),
        Case(
            "dead_bias_cnn",
            "dead_units",
            _setup(
                lambda: CNN(bn=False),
                _sgd(0.02),
                lambda s: _digits(s, 32),
                prepare=_bias("conv1", -4.0),
            ),
            dead_in("relu1"),
            "CNN",
            layer="relu1",
            split="heldout",
            note="conv1's bias at -4, no BN",
        ),
        Case(
            "saturated_tanh",
            "saturation",
            _setup(_mlp(*DIG, act=nn.Tanh, gain=8.0), _sgd(0.05), _digits),
            saturated_in("1"),
            "MLP",
            layer="1",
            note="tanh, init gain 8",
        ),
        Case(
            "saturated_sigmoid",
            "saturation",
            _setup(
                _mlp(32, 64, 64, 10, act=nn.Sigmoid, gain=1.0),
                _sgd(0.1),
                _synthetic,
                batches=lambda b: [(x * 10, y) for x, y in b],
            ),
            saturated_in("1"),
            "MLP",
            layer="1",
            split="heldout",
            note="sigmoid, inputs x10",
        ),
        Case(
            "unnormalized_pixels",
            "unnormalized_inputs",
            _setup(_mlp(*DIG), _sgd(0.001), _digits, batches=_raw_pixels),
            input_scale("0"),
            "MLP",
            layer="0",
            note="raw pixels 0..255",
        ),
        Case(
            "unnormalized_offset",
            "unnormalized_inputs",
            _setup(_mlp(32, 64, 64, 10), _adam(1e-3), _synthetic, batches=_offset_scale),
            input_scale("0"),
            "MLP",
            layer="0",
            split="heldout",
            note="features x100 + 50, Adam",
        ),
        Case(
            "frozen_by_mistake",
            "frozen_or_detached",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, prepare=_freeze("0.")),
            no_grad_for("0."),
            "MLP",
            layer="0",
            note="first layer requires_grad=False",
        ),
        Case(
            "detached_graph",
            "frozen_or_detached",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, step=lambda: detached_step(1)),
            no_grad_for("0."),
            "MLP",
            layer="0",
            split="heldout",
            note="output of module 1 detached",
        ),
        Case(
            "not_in_optimizer_mlp",
            "not_in_optimizer",
            _setup(_mlp(*DIG), _sgd(0.05), _digits, params=_without("2.")),
            never_moves("2."),
            "MLP",
            layer="2",
            note="layer 2 left out of SGD",
        ),
        Case(
            "not_in_optimizer_cnn",
            "not_in_optimizer",
            _setup(CNN, _adam(1e-3), lambda s: _digits(s, 32), params=_without("conv2.")),
            never_moves("conv2."),
            "CNN",
            layer="conv2",
            split="heldout",
            note="conv2 left out of Adam",
        ),
        Case(
            "no_zero_grad_mlp",
            "zero_grad_forgotten",
            _setup(_mlp(*DIG), _sgd(0.01), _digits, step=lambda: plain_step(zero_grad=False)),
            grad_grows(),
            "MLP",
            note="SGD, zero_grad forgotten",
        ),
        Case(
            "no_zero_grad_lstm",
            "zero_grad_forgotten",
            _setup(
                lambda: CharRNN("lstm"),
                _adam(3e-3),
                _chars,
                step=lambda: plain_step(zero_grad=False),
            ),
            grad_grows(),
            "LSTM",
            split="heldout",
            note="Adam, zero_grad forgotten",
        ),
        Case(
            "lr_zero_sgd",
            "lr_zero",
            _setup(_mlp(*DIG), _sgd(0.0), _digits),
            not_training(0.97),
            "MLP",
            note="SGD lr 0",
        ),
        Case(
            "lr_zero_schedule",
            "lr_zero",
            _setup(
                TinyTransformer,
                _adam(1e-3),
                _tokens,
                step=lambda: plain_step(
                    sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.0)
                ),
            ),
            not_training(0.97),
            "transformer",
            split="heldout",
            note="a schedule that returns 0",
        ),
        Case(
            "postln_no_warmup",
            "post_ln_no_warmup",
            _setup(lambda: TinyTransformer(6, 32, norm_first=False), _adam(3e-2), _tokens),
            not_training(0.8),
            "transformer",
            split="heldout",
            note="Post-LN x6, Adam 3e-2, no warm-up (Pre-LN trains at 3e-2)",
        ),
    ]
    return cases


CASES: list[Case] = _cases()


def by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(f"no fault case {name!r}; known: {', '.join(c.name for c in CASES)}")
